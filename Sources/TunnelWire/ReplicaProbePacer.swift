import NIOConcurrencyHelpers
import NIOCore

/// The pace a replica asks of agents that probed it but already hold it (``ReplicaProbe``), sized to the agents
/// that are still looking, not to all the agents it holds.
///
/// While a replica is away, every agent is missing it and each probes once a pace; the Service spreads the probes
/// over the replicas that remain. A pace sized to all agents (the `ceiling`: agents held over the target rate ×
/// replicas) keeps that storm near the target, but it stays as long when only a few agents are still looking:
/// each probe finds the returned replica with a fixed chance, so the number still looking falls by a fixed
/// fraction per pace, and the last of 10,000 agents arrived some 100 s after the first (docs/benchmarks.md).
///
/// So the pace follows the probes this replica actually receives: each window it is scaled by the rate seen over
/// the target rate. The probes a replica receives are (agents looking) / (pace × replicas in the Service); keeping
/// them at the target makes the pace shrink with the agents still looking, and the fleet's probe load stays near
/// `target` per replica throughout. The pace grows in one step when probes come faster than the target (checked as
/// soon as a window's worth has arrived) and shrinks by at most a quarter a window, never above the ceiling and
/// never below ``floor``; after a quiet spell, or when a storm begins, it is not shortened for a while. So a trickle
/// of probes (anyone can send one, before TLS) that brought the pace to the floor costs a new storm at most one
/// target's worth of extra probes.
public final class ReplicaProbePacer: Sendable {
    /// Probes per second per replica the pace aims at.
    public let target: Double
    /// The shortest pace asked for.
    public static let floor: TimeAmount = .milliseconds(500)
    /// How often the pace is reconsidered.
    static let window: TimeAmount = .seconds(1)
    /// Without a probe for this long, the next one starts again from the ceiling.
    static let quiet: TimeAmount = .seconds(10)
    /// After a quiet spell, the pace is not shortened for this long.
    static let rampUp: TimeAmount = .seconds(6)

    private struct State {
        var windowStart: NIODeadline?
        /// The first probe after a quiet spell: the storm's start.
        var stormStart: NIODeadline?
        var probes = 0
        /// The pace answered in the current window; nil before the first window and after a quiet spell.
        var pace: TimeAmount?
    }
    private let state = NIOLockedValueBox(State())

    /// `target`: probes per second per replica (``ServerConfiguration/replicaProbeRate``).
    public init(target: Int) {
        self.target = Double(max(1, target))
    }

    /// Counts one probe received at `now` and returns the pace to answer it with, at most `ceiling`.
    public func pace(now: NIODeadline = .now(), ceiling: TimeAmount) -> TimeAmount {
        let ceiling = max(ceiling, Self.floor)
        return state.withLockedValue { state in
            guard let start = state.windowStart, now - start < Self.quiet else {
                state = State(windowStart: now, stormStart: now, probes: 1, pace: nil)
                return ceiling
            }
            state.probes += 1
            let given = min(state.pace ?? ceiling, ceiling)
            let elapsed = now - start
            // Reconsidered each window, and at once when a window's worth of probes has come early: a storm that
            // meets a short pace (a trickle of probes, anyone's, brought it down) is answered within a target's
            // worth of probes, not a window later.
            if elapsed >= Self.window || Double(state.probes) > target * Double(Self.window.nanoseconds) / 1e9 {
                let rate = Double(state.probes) / max(Double(elapsed.nanoseconds) / 1e9, 0.001)
                let wanted = Double(given.nanoseconds) * rate / target
                // A storm begins: agents spread their first probes over a few seconds (``ReplicaTunnels``), and
                // until then the rate undercounts those looking, so only a longer pace is taken for a while.
                if rate > 2 * target { state.stormStart = now }
                let ramping = now - (state.stormStart ?? now) < Self.rampUp
                let lowest = ramping ? Double(given.nanoseconds) : Double(given.nanoseconds) * 0.75
                // Longer in one step (up to the ceiling), shorter by a quarter a window at most.
                let bounded = min(max(wanted, lowest), Double(ceiling.nanoseconds))
                state.pace = max(.nanoseconds(Int64(bounded)), Self.floor)
                state.windowStart = now
                state.probes = 0
            }
            return state.pace ?? given
        }
    }
}
