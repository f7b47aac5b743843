import TunnelPKI

/// A Service a pool's agents dial.
public struct PoolServer: Codable, Sendable, Equatable {
    public var service: String
    public var namespace = "kube-system"
    /// `ClusterIP` or `LoadBalancer`.
    public var type: String
    /// `private-line` or `internet`.
    public var path: String
}

/// What the plan decides for one edge node pool.
public struct PoolDecision: Codable, Sendable, Equatable {
    public var name: String
    public var connectivity: Connectivity
    public var cidrs: [CIDR]
    public var nodeSelector: [String: String]
    /// The Services the pool's agents dial, in order of preference (its ConfigMap's server addresses).
    public var servers: [PoolServer]
    public var reason: String
    /// The security-group rules this pool needs (also in the plan's `securityGroupRules`).
    public var securityGroupRules: [SecurityGroupRule]
}

extension NetworkPlan {
    /// The Service express-connect pools' agents dial over the line: ClusterIP, port `tcp` 10262.
    public static let lineServiceName = "x-tunnel-server-line-svc"

    /// "pool a", "pools a and b", "pools a, b and c".
    static func names(_ pools: [EdgePool]) -> String {
        let names = pools.map(\.name)
        guard let last = names.last else { return "no pool" }
        return names.count == 1 ? "pool \(last)" : "pools \(names.dropLast().joined(separator: ", ")) and \(last)"
    }

    /// The source document's version rules, per pool: before 1.20.11 the private line is a reconfiguration of the
    /// whole tunnel, so the cluster's pools are either all on the line or all on the internet; from 1.20.11 up to
    /// 1.22 there is no route to the line at all; from 1.22 every pool chooses its own.
    static func versionFindings(_ pools: [EdgePool], version: KubernetesVersion) -> [Finding] {
        let line = pools.filter { $0.connectivity == .expressConnect }
        let internet = pools.filter { $0.connectivity == .internet }
        guard !line.isEmpty, version < nodePoolFrom else { return [] }
        if version < reconfigurableBelow {
            guard !internet.isEmpty else { return [] }
            return [
                Finding(
                    severity: .error,
                    message:
                        "\(names(line)) (express-connect) and \(names(internet)) (internet) cannot be mixed on Kubernetes \(version): "
                        + "before 1.20.11 the private line is a reconfiguration of the whole tunnel (its Service becomes ClusterIP), "
                        + "not a property of a node pool; put every pool on express-connect, or upgrade to 1.22 or later, where "
                        + "each node pool chooses its own")
            ]
        }
        return line.map { pool in
            Finding(
                severity: .error,
                message:
                    "pool \(pool.name) is express-connect, but Kubernetes \(version) is between 1.20.11 and 1.22: the "
                    + "tunnel can no longer be reconfigured, and node pools over a private line come with 1.22; upgrade the "
                    + "cluster to 1.22 or later, or keep the pool on the internet until then")
        }
    }

    /// Pools whose networks overlap: a node there may claim its address with either pool's token.
    static func overlapFindings(_ pools: [EdgePool]) -> [Finding] {
        var findings: [Finding] = []
        for (index, pool) in pools.enumerated() {
            for other in pools[(index + 1)...] {
                guard
                    let (a, b) = pool.cidrs.lazy.flatMap({ a in other.cidrs.lazy.map { (a, $0) } }).first(where: {
                        $0.0.overlaps($0.1)
                    })
                else { continue }
                findings.append(
                    Finding(
                        severity: .warning,
                        message:
                            "pools \(pool.name) and \(other.name) overlap (\(a) and \(b)): a node there may join with either "
                            + "pool's bootstrap token"))
            }
        }
        return findings
    }
}

extension PoolDecision {
    /// The node selector as `key=value` pairs, sorted by key.
    public var selectorText: String {
        nodeSelector.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
    }
}

extension NetworkPlan {
    /// `edgetunnel plan`'s exit code: 1 when a finding is an error (the plan does not hold), else 0.
    public var exitCode: Int32 { findings.contains { $0.severity == .error } ? 1 : 0 }
}
