import NIOConcurrencyHelpers
import NIOCore
import TunnelPKI
import TunnelSupport

/// At most `perKey` events per key in a fixed window (joins per source address, certificate renewals per node
/// and per source). The table of keys is bounded: past ``maxKeys`` (after forgetting expired ones, at most once a
/// window) new keys are refused until the window passes, so a flood of sources cannot grow it. Thread-safe.
final class WindowedLimit: Sendable {
    let perKey: Int
    let window: TimeAmount
    /// Keys tracked at once.
    static let maxKeys = 10_000

    private struct Table {
        var counts: [String: (count: Int, since: NIODeadline)] = [:]
        var lastPrune = NIODeadline.uptimeNanoseconds(0)
    }
    private let table = NIOLockedValueBox(Table())

    init(perKey: Int, window: TimeAmount) {
        self.perKey = perKey
        self.window = window
    }

    /// Counts one event for `key`; false when it is over the limit.
    func admit(_ key: String, now: NIODeadline = .now()) -> Bool {
        table.withLockedValue { table in
            if table.counts[key] == nil && table.counts.count >= Self.maxKeys {
                if now - table.lastPrune >= window {
                    table.lastPrune = now
                    table.counts = table.counts.filter { now - $0.value.since < window }
                }
                guard table.counts.count < Self.maxKeys else { return false }
            }
            var entry = table.counts[key] ?? (0, now)
            if now - entry.since >= window { entry = (0, now) }
            entry.count += 1
            table.counts[key] = entry
            return entry.count <= perKey
        }
    }

    /// Gives back one event of `key` counted in the window that began at `since` (an admitted event that did
    /// not happen after all). Nothing changes once that window has passed.
    func refund(_ key: String, admittedAt since: NIODeadline) {
        table.withLockedValue { table in
            guard var entry = table.counts[key], entry.count > 0, since - entry.since < window, since >= entry.since
            else { return }
            entry.count -= 1
            table.counts[key] = entry
        }
    }
}

/// What stands before a certificate renewal besides the per-connection interval (``AgentSession``): a renewal
/// signs a certificate, so a node holder opening connection after connection gets at most one per
/// ``AgentSession/renewalInterval``, and one source address at most ``perSource`` in that time (many stolen
/// certificates behind one address).
struct RenewalGuard: Sendable {
    static let perSource = 20
    private let perNode = WindowedLimit(perKey: 1, window: AgentSession.renewalInterval)
    private let sources = WindowedLimit(perKey: RenewalGuard.perSource, window: AgentSession.renewalInterval)

    /// Nil when `node`, asking from `source`, may have a certificate signed now; otherwise why not.
    func admit(node: String, source: String, now: NIODeadline = .now()) -> String? {
        let interval = AgentSession.renewalInterval.nanoseconds / 1_000_000_000
        guard sources.admit(SourceKey.of(source), now: now) else {
            return "more than \(Self.perSource) renewals from \(source) within \(interval)s"
        }
        guard perNode.admit(node, now: now) else {
            return "node \(node) was renewed within \(interval)s (on another connection)"
        }
        return nil
    }

    /// A renewal admitted at `now` signed nothing (a revoked node, a bad request, a failed signature): the node's
    /// slot is given back, so that its next, valid, request is not refused for a renewal that never was. The
    /// source's count stays charged: many failing renewals from one address still meet ``perSource``.
    func signedNothing(node: String, admittedAt now: NIODeadline) {
        perNode.refund(node, admittedAt: now)
    }
}
