import Logging
import NIOConcurrencyHelpers
import NIOCore
import TunnelWire

/// The agent's tunnels to the other server replicas (konnectivity's model): the server address is a Service
/// that balances over the replicas, and each replica can reach only the nodes that hold a tunnel to it, so the
/// agent keeps dialing that address until it holds one tunnel per distinct server ID. The first tunnel (the
/// agent's *primary*, which the failover loop in ``EdgeTunnelAgent/run()`` manages) says how many replicas
/// there are (``HelloOK/serverCount``, later ``ServerCount``); these are the others, on the primary's address.
///
/// A dial names the replicas already held (``Hello/haveServers``): a replica that is one of them refuses at once,
/// before TLS (``ReplicaProbe``) or before registering anything, and the next dial waits the pace that replica asked
/// for, jittered (the Service picks replicas at random, so with k of n held a dial finds a new one with probability
/// (n-k)/n). When the primary dies while
/// another tunnel is healthy, that one becomes the primary and no dial is needed (``promote(for:)``).
///
/// Nothing polls: every change checks at once (the primary changes, a count is learned, a tunnel becomes unusable,
/// a dial ends), and a check that finds the next dial not yet due schedules one more check for when it is.
final class ReplicaTunnels: @unchecked Sendable {
    unowned let agent: EdgeTunnelAgent
    private let lock = NIOLock()
    private var tunnels: [AgentTunnel] = []
    private var serverCount = 1
    private var phase = Phase.idle
    /// No dial before this (a backoff, a replica's pace, the spread after a loss).
    private var notBefore = NIODeadline.uptimeNanoseconds(0)
    private var duplicates = 0
    private var failures = 0
    /// Replicas held at the last check: fewer now means one was lost.
    private var lastHeld = 0

    /// After a held replica is lost (it restarts, or the set shrinks), the first redial waits a random moment up to
    /// this: every agent of the fleet notices the loss in the same second, and 10,000 agents probing at once
    /// flooded a 2-core test machine until established tunnels missed their keepalives (docs/benchmarks.md).
    static let lostReplicaSpread: TimeAmount = .seconds(5)
    /// The dial under way, for shutdown to wait on.
    private var dial: Task<Void, Never>?
    /// The loop that runs the check due at `notBefore`, and that check.
    private var loop: EventLoop?
    private var wake: Scheduled<Void>?

    private enum Phase {
        /// The next check may dial.
        case idle
        /// A dial is under way: checks meanwhile only tidy up; its end checks again.
        case dialing
        /// Stopping: no dial any more.
        case stopped
    }

    init(agent: EdgeTunnelAgent) {
        self.agent = agent
    }

    /// Checks at once on every change; `loop` runs the checks that wait for a backoff.
    func start(on loop: EventLoop) {
        lock.withLock { self.loop = loop }
    }

    /// The tunnels to other replicas (registered, not yet known to be unusable).
    var extras: [AgentTunnel] { lock.withLock { tunnels } }

    /// How many replicas the servers last said there are.
    var count: Int { lock.withLock { serverCount } }

    /// A server said how many replicas there are.
    func learned(count: Int) {
        let changed = lock.withLock { () -> Bool in
            let count = max(1, min(count, 1000))
            guard count != serverCount else { return false }
            serverCount = count
            // A new count: the backoff starts afresh, after a random moment up to the spread (a replica's Lease
            // reaches every agent of the fleet in the same second; they must not all probe in it).
            notBefore = NIODeadline.now() + .nanoseconds(Int64.random(in: 0...Self.lostReplicaSpread.nanoseconds))
            duplicates = 0
            return true
        }
        if changed {
            agent.logger.info("server replicas: \(count)")
            check()
        }
    }

    /// A healthy tunnel on `address` to make the primary, taken out of this set; nil if there is none.
    func promote(for address: String) -> AgentTunnel? {
        let fresh = agent.configuration.keepaliveInterval * 2
        return lock.withLock { () -> AgentTunnel? in
            guard
                let index = tunnels.firstIndex(where: {
                    $0.address.text == address && $0.channel?.isActive == true && !$0.declaredDead && !$0.isUnusable
                        && NIODeadline.now() - $0.mux.lastFrameReceived < fresh
                })
            else { return nil }
            return tunnels.remove(at: index)
        }
    }

    /// Dials one more replica when fewer than the count are held, unless a dial is under way or backing off.
    func check() {
        guard !agent.isStopping, let primary = agent.primary, let primaryID = primary.serverID else { return }
        // Tunnels on another address (the primary moved) or unusable (died, GOAWAY) leave the set and drain.
        let (stale, held, wanted) = lock.withLock { () -> ([AgentTunnel], [String], Bool) in
            let stale = tunnels.filter { $0.address.text != primary.address.text || $0.isUnusable }
            tunnels.removeAll { t in stale.contains { $0 === t } }
            let held = [primaryID] + tunnels.compactMap(\.serverID)
            if held.count < lastHeld {
                let spread = NIODeadline.now() + .nanoseconds(Int64.random(in: 0...Self.lostReplicaSpread.nanoseconds))
                notBefore = max(notBefore, spread)
            }
            lastHeld = held.count
            guard case .idle = phase, held.count < serverCount else { return (stale, held, false) }
            guard NIODeadline.now() >= notBefore else {
                checkAgain(at: notBefore)
                return (stale, held, false)
            }
            phase = .dialing
            return (stale, held, true)
        }
        let wantedCount = count
        for tunnel in stale { agent.retireTunnel(tunnel) }
        agent.metrics.serverTunnels.set(Int64(held.count))
        guard wanted else { return }
        let address = primary.address
        let task = Task {
            do {
                // Several probes at once when replicas are missing: the Service picks at random, so each finds a
                // missing one with probability (n - k) / n; a probe costs the server an accept and a line.
                // After a round that found only held replicas, one probe a round: while a replica is away (a
                // restart) every probe of every agent lands on a held one.
                let probes = lock.withLock { duplicates } == 0 ? min(4, 2 * (wantedCount - held.count) + 1) : 1
                let tunnel = try await agent.connect(to: address, haveServers: held, primary: false, probes: probes)
                let now = agent.primary
                let keep = lock.withLock { () -> Bool in
                    dialEnded()
                    duplicates = 0
                    failures = 0
                    // The primary may have moved meanwhile, or the same replica been reached twice.
                    guard address.text == now?.address.text, let id = tunnel.serverID, id != now?.serverID,
                        !tunnels.contains(where: { $0.serverID == id })
                    else { return false }
                    tunnels.append(tunnel)
                    return true
                }
                if keep {
                    agent.logger.info(
                        "tunnel to server replica \(tunnel.serverID ?? "?") registered",
                        metadata: ["server": "\(address)"])
                    tunnel.whenUnusable { [weak self] in self?.check() }
                } else {
                    agent.retireTunnel(tunnel)
                }
            } catch let duplicate as DuplicateServer {
                agent.logger.debug("dialed a replica already held: \(duplicate.reason)")
                lock.withLock {
                    dialEnded()
                    duplicates += 1
                    notBefore = .now() + Self.wait(afterDuplicates: duplicates, pace: duplicate.paceMilliseconds)
                }
            } catch {
                let wait = lock.withLock { () -> TimeAmount in
                    dialEnded()
                    failures += 1
                    let wait = agent.backoff(attempt: failures)
                    notBefore = .now() + wait
                    return wait
                }
                agent.logger.warning(
                    "cannot reach another server replica via \(address): \(error); again in \(wait.nanoseconds / 1_000_000) ms"
                )
            }
            agent.metrics.serverTunnels.set(Int64(1 + extras.count))
            check()  // the next replica, or a check when the wait this dial set is over
        }
        lock.withLock { dial = task }
    }

    /// Under the lock: a dial ended (the phase goes back to idle unless stopping).
    private func dialEnded() {
        if case .dialing = phase { phase = .idle }
    }

    /// Under the lock: one check at `deadline`, replacing one scheduled before (computed from an older `notBefore`).
    private func checkAgain(at deadline: NIODeadline) {
        guard let loop else { return }
        wake?.cancel()
        wake = loop.scheduleTask(deadline: deadline) { [weak self] in self?.check() }
    }

    /// The wait before the next probe after `duplicates` rounds in a row reached only held replicas.
    ///
    /// A duplicate costs the server an accept and a line (``ReplicaProbe``), and while a restarting replica is away
    /// every probe finds a held one. The server says at what pace it wants them (its agents over the probe rate it
    /// aims at): the wait is that pace, jittered by ±50% so that agents do not fall into step. A server that says
    /// nothing: full jitter up to 250 ms × 2^n, at most 10 s.
    static func wait(afterDuplicates duplicates: Int, pace: Int64?) -> TimeAmount {
        if let pace {
            let pace = min(max(pace, ReplicaProbe.paceRange.lowerBound), ReplicaProbe.paceRange.upperBound)
            return .milliseconds(Int64.random(in: pace / 2...pace + pace / 2))
        }
        let ceiling = min(Int64(10_000_000_000), Int64(250_000_000) << Int64(min(max(duplicates, 0), 6)))
        return .nanoseconds(Int64.random(in: 0...ceiling))
    }

    /// Waits for a dial under way (at shutdown, before the event loops go).
    func finishDials() async {
        await lock.withLock { dial }?.value
    }

    /// Every tunnel, for shutdown.
    func takeAll() -> [AgentTunnel] {
        lock.withLock {
            phase = .stopped  // no new dial once stopping
            wake?.cancel()
            wake = nil
            defer { tunnels = [] }
            return tunnels
        }
    }
}

/// A replica refused the tunnel because the agent already holds one to it.
struct DuplicateServer: Error, CustomStringConvertible {
    let reason: String
    /// The longest pace the replicas reached asked for (``ReplicaProbe/Answer/paceMilliseconds``).
    var paceMilliseconds: Int64?
    var description: String { "duplicate: \(reason)" }
}
