import NIOCore

/// When a tunnel is dead and when to PING it: one rule for both ends, checked by a repeating timer on the
/// tunnel's loop.
///
/// The tunnel is dead once nothing arrived for `deadAfter` (any frame counts, not only PONG). The agent PINGs
/// every `interval` whatever else flows; the server only PINGs a tunnel quiet for `interval`, because an agent's
/// own PINGs already prove the path both ways (with 10,000 agents, a server PING on top would be 2,000 more TLS
/// records a second each way).
public struct Keepalive: Sendable {
    public enum Action: Equatable, Sendable {
        case nothing
        case ping
        case dead
    }

    public let interval: TimeAmount
    public let deadAfter: TimeAmount
    /// PING only when nothing arrived for `interval` (the server); otherwise every `interval` (the agent).
    public let pingOnlyWhenQuiet: Bool
    private var lastPing: NIODeadline

    public init(interval: TimeAmount, deadAfter: TimeAmount, pingOnlyWhenQuiet: Bool, now: NIODeadline = .now()) {
        self.interval = interval
        self.deadAfter = deadAfter
        self.pingOnlyWhenQuiet = pingOnlyWhenQuiet
        self.lastPing = now
    }

    /// What to do at `now`, the last frame having arrived at `lastFrame`; a PING returned counts as sent.
    public mutating func check(now: NIODeadline, lastFrame: NIODeadline) -> Action {
        let quiet = now - lastFrame
        if quiet > deadAfter { return .dead }
        let due = pingOnlyWhenQuiet ? quiet >= interval : now - lastPing >= interval
        guard due else { return .nothing }
        lastPing = now
        return .ping
    }
}
