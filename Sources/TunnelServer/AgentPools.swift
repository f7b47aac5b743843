import NIOConcurrencyHelpers
import Prometheus
import TunnelSupport

extension TunnelServerCore {
    /// The edge pool of `session`'s node: with Node objects its Node's pool label (an agent cannot claim another
    /// pool; a Node without the label is in none), else the pool its agent declared at HELLO.
    func pool(of session: AgentSession) -> String? {
        if let directory = nodeDirectory { return directory.pool(of: session.nodeName) }
        return session.declaredPool
    }
}

/// `edge_tunnel_server_pool_agents{pool, path}`: connected agents by edge pool and path. Thread-safe.
///
/// Label values are bounded: at most ``maxPools`` pools have a series of their own, taken in order of appearance
/// and given back when a pool has no agent left at a scrape; agents of further pools count under
/// `pool="other"`. Agents in no pool count under `pool=""`. `path` is `private`, `internet` or `unknown`. At most
/// (``maxPools`` + 2) × 3 series exist at once.
final class PoolAgentGauges: @unchecked Sendable {
    static let maxPools = 64
    static let other = "other"
    static let name = "edge_tunnel_server_pool_agents"
    static let help =
        "Agents connected to this server by edge pool and path (private, internet, unknown); pools beyond 64 count as other."

    private let registry: PrometheusCollectorRegistry
    private let lock = NIOLock()
    /// Pools that have a series of their own now.
    private var named: Set<String> = []
    /// Every series, by (pool label, path).
    private var gauges: [Key: Gauge] = [:]

    struct Key: Hashable {
        var pool: String
        var path: String
    }

    init(registry: PrometheusCollectorRegistry) {
        self.registry = registry
    }

    /// Sets the gauges from the agents connected now, each given as its pool and its path as shown.
    /// Returns the counts set, by label values (for tests).
    @discardableResult
    func update(_ agents: [(pool: String?, path: String)]) -> [Key: Int] {
        lock.withLock {
            let present = Set(agents.compactMap(\.pool))
            // A pool with no agent left gives its series back, so that the labels stay bounded as pools come and go.
            for pool in named where !present.contains(pool) {
                named.remove(pool)
                for (key, gauge) in gauges where key.pool == pool {
                    registry.unregisterGauge(gauge)
                    gauges[key] = nil
                }
            }
            // New pools in name order, so that which pools spill over into `other` does not depend on hashing.
            for pool in present.subtracting(named).sorted() where named.count < Self.maxPools {
                named.insert(pool)
            }
            var counts: [Key: Int] = [:]
            for agent in agents {
                let label = agent.pool.map { named.contains($0) ? $0 : Self.other } ?? ""
                counts[Key(pool: label, path: agent.path), default: 0] += 1
            }
            // Series seen before and empty now read 0 (dashboards see a drop, not a gap).
            for (key, gauge) in gauges where counts[key] == nil { gauge.set(Double(0)) }
            for (key, count) in counts {
                let gauge =
                    gauges[key]
                    ?? {
                        let made = registry.makeGauge(
                            descriptor: .named(Self.name, help: Self.help),
                            labels: [("pool", key.pool), ("path", key.path)])
                        gauges[key] = made
                        return made
                    }()
                gauge.set(Double(count))
            }
            return counts
        }
    }

    /// How many series exist now.
    var seriesCount: Int { lock.withLock { gauges.count } }
}
