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

    /// While streams move data (the agent's tunnel, ``check(now:lastFrame:active:)``): PING this often, and the
    /// tunnel is dead once nothing arrived for `deadAfter`. A lost private line is then left within about
    /// `deadAfter` + a check's period, not after the idle keepalive's 9 s (issue 26: streams continue within 2 s).
    public struct Active: Sendable {
        public var interval: TimeAmount
        public var deadAfter: TimeAmount
        public init(interval: TimeAmount, deadAfter: TimeAmount) {
            self.interval = interval
            self.deadAfter = deadAfter
        }
        /// 500 ms and 1.5 s: three PINGs unanswered, with nothing else arriving either (on the agent, an ACK of its
        /// TCP counts as arriving: ``SocketTuning/PathTiming``). A keepalive PING doubles as the confirming PING of
        /// ended streams and is skipped when any PING went out in the last 400 ms (``TunnelMux/keepalivePing(skipWithin:)``),
        /// so the two stay under 4 a second together: the limit of servers before 8 a second
        /// (``TunnelLimits/pingsPerSecond``). A stall of 1.5 s takes a segment lost four times in a row (RTOs of 200, 400, 800 ms
        /// and more): 5% random loss both ways does not cause it; a 400-ms queue on a slow line is far below it.
        public static let standard = Active(interval: .milliseconds(500), deadAfter: .milliseconds(1500))
    }

    public let interval: TimeAmount
    public let deadAfter: TimeAmount
    /// PING only when nothing arrived for `interval` (the server); otherwise every `interval` (the agent).
    public let pingOnlyWhenQuiet: Bool
    public let active: Active?
    private var lastPing: NIODeadline
    /// Since when the tunnel is active (data moving): only what happened since counts against `active.deadAfter`,
    /// so an idle tunnel that becomes busy is not judged by its idle quiet.
    private var activeSince: NIODeadline?

    public init(
        interval: TimeAmount, deadAfter: TimeAmount, pingOnlyWhenQuiet: Bool, active: Active? = nil,
        now: NIODeadline = .now()
    ) {
        self.interval = interval
        self.deadAfter = deadAfter
        self.pingOnlyWhenQuiet = pingOnlyWhenQuiet
        self.active = active
        self.lastPing = now
    }

    /// What to do at `now`, the last frame having arrived at `lastFrame`; a PING returned counts as sent.
    /// `isActive`: data moved on the tunnel lately; then the ``Active`` rule applies too.
    /// `lossAtLeast`: the shortest silence the path itself can call a loss (``SocketTuning/PathTiming``); the active
    /// rule never declares death sooner.
    public mutating func check(
        now: NIODeadline, lastFrame: NIODeadline, isActive: Bool = false, lossAtLeast: TimeAmount = .zero
    ) -> Action {
        let quiet = now - lastFrame
        if quiet > deadAfter { return .dead }
        if let active, isActive {
            guard let since = activeSince else {
                activeSince = now
                lastPing = now
                return .ping
            }
            let deadAfter = max(active.deadAfter, lossAtLeast)
            if quiet > deadAfter, now - since > deadAfter { return .dead }
            guard now - lastPing >= active.interval else { return .nothing }
            lastPing = now
            return .ping
        }
        activeSince = nil
        let due = pingOnlyWhenQuiet ? quiet >= interval : now - lastPing >= interval
        guard due else { return .nothing }
        lastPing = now
        return .ping
    }
}
