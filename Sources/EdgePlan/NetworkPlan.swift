import TunnelPKI

/// How the edge reaches the cloud.
public enum Connectivity: String, Codable, Sendable, CaseIterable {
    case internet
    case expressConnect = "express-connect"

    public init(parsing text: String) throws {
        guard let value = Connectivity(rawValue: text.lowercased()) else {
            throw PlanError("unknown connectivity \"\(text)\": use internet or express-connect")
        }
        self = value
    }
}

/// The facts of a cluster that the plan decides from (flags, or a YAML file with the same names in camelCase).
public struct PlanInput: Codable, Sendable, Equatable {
    public var connectivity: Connectivity
    /// The business needs outbound internet from the cluster.
    public var internetEgress: Bool = false
    /// The API server must be reachable from the internet.
    public var publicAPIServer: Bool = false
    public var kubernetesVersion: KubernetesVersion
    /// The cluster already exists (an EIP can then no longer be chosen).
    public var existingCluster: Bool = false
    /// Whether the existing cluster got an EIP at creation; only meaningful with `existingCluster`.
    public var hasEIP: Bool?
    public var edgeCIDRs: [CIDR] = []
    /// Cloud applications talk to edge applications over the container network (VXLAN overlay).
    public var cloudEdgeContainerNetwork: Bool = true
    /// The edge node pools, when the cluster has them; nil: one implicit pool of every edge node, whose
    /// connectivity is `connectivity` and whose networks are `edgeCIDRs`.
    public var pools: [EdgePool]?

    public init(connectivity: Connectivity, kubernetesVersion: KubernetesVersion) {
        self.connectivity = connectivity
        self.kubernetesVersion = kubernetesVersion
    }

    /// A cluster of pools: `connectivity` is express-connect when every pool is, otherwise internet (the cluster
    /// then has a public path); `edgeCIDRs` are every pool's networks.
    public init(pools: [EdgePool], kubernetesVersion: KubernetesVersion) {
        self.init(connectivity: Self.connectivity(of: pools), kubernetesVersion: kubernetesVersion)
        self.pools = pools
        var cidrs: [CIDR] = []
        for cidr in pools.flatMap(\.cidrs) where !cidrs.contains(cidr) { cidrs.append(cidr) }
        edgeCIDRs = cidrs
    }

    /// express-connect when every pool is, otherwise internet.
    public static func connectivity(of pools: [EdgePool]) -> Connectivity {
        pools.allSatisfy { $0.connectivity == .expressConnect } ? .expressConnect : .internet
    }

    /// Contradictions are errors, not guesses.
    public func validate() throws {
        if hasEIP != nil && !existingCluster {
            throw PlanError("--has-eip describes an existing cluster: give --existing-cluster too")
        }
        if let pools {
            guard !pools.isEmpty else { throw PlanError("pools: the list is empty") }
            try EdgePool.validate(pools)
            if connectivity != Self.connectivity(of: pools),
                let odd = pools.first(where: { $0.connectivity != connectivity })
            {
                throw PlanError(
                    "connectivity \(connectivity.rawValue) contradicts pool \(odd.name) (\(odd.connectivity.rawValue)): "
                        + "with pools the connectivity is each pool's; leave --connectivity out")
            }
        }
    }
}

/// How loud a finding is.
public enum Severity: String, Codable, Sendable, Comparable {
    case info, warning, error

    public static func < (lhs: Severity, rhs: Severity) -> Bool {
        let order: [Severity] = [.info, .warning, .error]
        return order.firstIndex(of: lhs)! < order.firstIndex(of: rhs)!
    }
}

/// One decision with the reason behind it.
public struct Decision: Codable, Sendable, Equatable {
    public var needed: Bool
    public var reason: String
}

public struct ServiceDecision: Codable, Sendable, Equatable {
    public var name = "x-tunnel-server-svc"
    public var namespace = "kube-system"
    /// `LoadBalancer` or `ClusterIP`.
    public var type: String
    public var reason: String
}

/// How the tunnel moves to the private line, by Kubernetes version.
public struct MigrationDecision: Codable, Sendable, Equatable {
    public enum Path: String, Codable, Sendable {
        /// Below 1.20.11: the tunnel's configuration can be changed.
        case reconfigureTunnel = "reconfigure-tunnel"
        /// 1.22 and later: a dedicated edge node pool that connects over the private line.
        case dedicatedNodePool = "dedicated-node-pool"
        /// 1.20.11 up to 1.22: neither path is documented.
        case upgrade
        /// Over the internet nothing moves.
        case notApplicable = "not-applicable"
    }
    public var path: Path
    public var reason: String
    /// What to do, step by step.
    public var steps: [String]
}

/// A security-group rule the cluster needs, with the command that adds it.
public struct SecurityGroupRule: Codable, Sendable, Equatable {
    public var direction = "ingress"
    public var ipProtocol: String
    public var portRange: String
    public var sourceCidrIp: String
    public var policy = "accept"
    public var priority = 1
    public var description: String
    public var command: String
}

public struct Finding: Codable, Sendable, Equatable {
    public var severity: Severity
    public var message: String
}

/// The network plan: every decision of the source document, with reasons. Its JSON form is documented in
/// `docs/PLAN.md` and versioned by `schemaVersion`.
public struct NetworkPlan: Codable, Sendable, Equatable {
    public var schemaVersion = 1
    public var input: PlanInput
    public var snat: Decision
    public var eip: Decision
    public var tunnelService: ServiceDecision
    public var privateLine: MigrationDecision
    public var securityGroupRules: [SecurityGroupRule]
    public var findings: [Finding]
    /// With pools: the Service express-connect pools' agents dial over the line (absent without such a pool).
    public var lineService: ServiceDecision?
    /// With pools: what each pool's agents dial, and the rules each pool needs (absent without pools).
    public var pools: [PoolDecision]?

    /// Versions the source document draws lines at.
    public static let reconfigurableBelow = KubernetesVersion(1, 20, 11)
    public static let nodePoolFrom = KubernetesVersion(1, 22, 0)

    /// Decides everything from the input.
    public init(input: PlanInput, regionID: String? = nil, securityGroupID: String? = nil) throws {
        try input.validate()
        self.input = input
        let pools = input.pools ?? []
        let linePools = pools.filter { $0.connectivity == .expressConnect }
        let internetPools = pools.filter { $0.connectivity == .internet }
        // Every edge site behind the line (the whole cluster, or every pool), and whether any site uses the line.
        let privateLine = input.connectivity == .expressConnect
        let anyLine = pools.isEmpty ? privateLine : !linePools.isEmpty
        var findings: [Finding] = []

        // SNAT gives the cluster outbound internet; the tunnel itself never needs it (agents dial in).
        if input.internetEgress {
            snat = Decision(
                needed: true,
                reason: "the business needs outbound internet access: configure SNAT on the VPC's NAT gateway")
        } else if privateLine {
            snat = Decision(
                needed: false, reason: "over a private line without a need for outbound internet, SNAT is not needed")
        } else {
            snat = Decision(
                needed: false,
                reason: "no need for outbound internet was given; the tunnel does not need SNAT (agents dial in)")
        }

        // EIP exposes the API server on the internet; it can only be chosen when the cluster is created.
        let eipNeeded: Bool
        if !privateLine {
            eipNeeded = true
            eip = Decision(
                needed: true,
                reason: pools.isEmpty
                    ? "over the internet, edge nodes reach the API server at a public address: an EIP is required"
                    : "the nodes of \(Self.names(internetPools)) reach the API server over the internet, at a public address: an EIP is required"
            )
        } else if input.publicAPIServer {
            eipNeeded = true
            eip = Decision(
                needed: true,
                reason:
                    "the API server must be reachable from the internet: an EIP is required even with a private line")
        } else {
            eipNeeded = false
            eip = Decision(
                needed: false, reason: "over a private line edge nodes reach the API server privately: no EIP is needed"
            )
        }
        if eipNeeded {
            if input.existingCluster && input.hasEIP == false {
                findings.append(
                    Finding(
                        severity: .error,
                        message:
                            "the existing cluster has no EIP and one cannot be attached to its API server afterwards: "
                            + "create a new cluster with \"Expose API server with EIP\" and move the workloads, "
                            + (privateLine
                                ? "or keep the API server private and reach it over the private line"
                                : "or connect the edge over a private line (express-connect) so no public API server is needed")
                    ))
            } else if input.existingCluster && input.hasEIP == nil {
                findings.append(
                    Finding(
                        severity: .warning,
                        message:
                            "an EIP is required but it is unknown whether the existing cluster has one (give --has-eip or --no-has-eip): it cannot be added afterwards"
                    ))
            } else if !input.existingCluster {
                findings.append(
                    Finding(
                        severity: .info,
                        message:
                            "choose \"Expose API server with EIP\" when creating the cluster: it cannot be attached later"
                    ))
            }
        }

        if privateLine {
            tunnelService = ServiceDecision(
                type: "ClusterIP",
                reason:
                    "over a private line agents reach the tunnel server's Service address through the line: ClusterIP, no public load balancer"
            )
        } else if linePools.isEmpty {
            tunnelService = ServiceDecision(
                type: "LoadBalancer",
                reason: "over the internet agents reach the tunnel server through a public load balancer")
        } else {
            tunnelService = ServiceDecision(
                type: "LoadBalancer",
                reason: "the agents of \(Self.names(internetPools)) reach the tunnel server "
                    + "through a public load balancer; those of \(Self.names(linePools)) through \(Self.lineServiceName) over the line"
            )
        }

        self.privateLine = Self.migration(
            version: input.kubernetesVersion, privateLine: anyLine, linePools: pools.isEmpty ? nil : linePools)
        if pools.isEmpty {
            if self.privateLine.path == .upgrade {
                findings.append(Finding(severity: .warning, message: self.privateLine.reason))
            }
        } else {
            findings += Self.versionFindings(pools, version: input.kubernetesVersion)
        }

        let region = regionID ?? "<region-id>"
        let group = securityGroupID ?? "<security-group-id>"
        func rule(_ proto: String, _ port: Int, _ cidr: CIDR, _ description: String) -> SecurityGroupRule {
            let field = cidr.isIPv4 ? "--SourceCidrIp" : "--Ipv6SourceCidrIp"
            let command =
                "aliyun ecs AuthorizeSecurityGroup --RegionId \(region) --SecurityGroupId \(group) "
                + "--IpProtocol \(proto) --PortRange \(port)/\(port) \(field) \(cidr) --Policy accept --Priority 1 "
                + "--Description \"\(description)\""
            return SecurityGroupRule(
                ipProtocol: proto, portRange: "\(port)/\(port)", sourceCidrIp: cidr.description,
                description: description, command: command)
        }
        var rules: [SecurityGroupRule] = []
        if pools.isEmpty {
            if input.cloudEdgeContainerNetwork {
                for cidr in input.edgeCIDRs {
                    rules.append(rule("udp", 8472, cidr, "VXLAN container network from edge \(cidr)"))
                }
            }
            if privateLine {
                for cidr in input.edgeCIDRs {
                    rules.append(rule("tcp", 10262, cidr, "EdgeTunnel agents from edge \(cidr) over the private line"))
                }
            }
            if input.edgeCIDRs.isEmpty && (input.cloudEdgeContainerNetwork || privateLine) {
                findings.append(
                    Finding(
                        severity: .warning,
                        message:
                            "no --edge-cidr given: the security-group rules (\(input.cloudEdgeContainerNetwork ? "UDP 8472" : "")\(input.cloudEdgeContainerNetwork && privateLine ? ", " : "")\(privateLine ? "TCP 10262" : "")) cannot be rendered"
                    ))
            }
            self.pools = nil
            lineService = nil
        } else {
            var decisions: [PoolDecision] = []
            for pool in pools {
                let line = pool.connectivity == .expressConnect
                var poolRules: [SecurityGroupRule] = []
                // The overlay crosses between the cloud and every pool when the container network spans them.
                if input.cloudEdgeContainerNetwork {
                    for cidr in pool.cidrs {
                        poolRules.append(
                            rule("udp", 8472, cidr, "VXLAN container network from edge pool \(pool.name) \(cidr)"))
                    }
                }
                // Agents of a line pool dial the server's pods through the line: the security group sees their
                // own addresses. Internet pools arrive through the public load balancer.
                if line {
                    for cidr in pool.cidrs {
                        poolRules.append(
                            rule(
                                "tcp", 10262, cidr,
                                "EdgeTunnel agents of edge pool \(pool.name) \(cidr) over the private line"))
                    }
                }
                if pool.cidrs.isEmpty {
                    findings.append(
                        Finding(
                            severity: .warning,
                            message:
                                "pool \(pool.name) has no CIDR (cidr=): its security-group rules cannot be rendered, and its "
                                + "bootstrap token cannot name the node IPs (status.hostIP) its agents claim"))
                }
                let lineServer = PoolServer(service: Self.lineServiceName, type: "ClusterIP", path: "private-line")
                let publicServer = PoolServer(service: tunnelService.name, type: tunnelService.type, path: "internet")
                let servers: [PoolServer]
                let reason: String
                if line {
                    servers = internetPools.isEmpty ? [lineServer] : [lineServer, publicServer]
                    reason =
                        "over the private line to \(Self.lineServiceName) (ClusterIP)"
                        + (internetPools.isEmpty
                            ? "; the cluster has no internet pool, so there is no public address to fail over to"
                            : "; the public load balancer second, for failover when the line is lost")
                } else {
                    servers = [publicServer]
                    reason =
                        "over the internet to the public load balancer of \(tunnelService.name); moving the pool onto the "
                        + "private line is one edit of its ConfigMap edge-tunnel-pool-\(pool.name) (the line address first)"
                }
                decisions.append(
                    PoolDecision(
                        name: pool.name, connectivity: pool.connectivity, cidrs: pool.cidrs,
                        nodeSelector: pool.nodeSelector,
                        servers: servers, reason: reason, securityGroupRules: poolRules))
            }
            findings += Self.overlapFindings(pools)
            var seen: Set<String> = []
            for poolRule in decisions.flatMap(\.securityGroupRules)
            where seen.insert("\(poolRule.ipProtocol) \(poolRule.portRange) \(poolRule.sourceCidrIp)").inserted {
                rules.append(poolRule)
            }
            self.pools = decisions
            lineService =
                linePools.isEmpty
                ? nil
                : ServiceDecision(
                    name: Self.lineServiceName, type: "ClusterIP",
                    reason:
                        "the agents of \(Self.names(linePools)) reach the tunnel server's pods through the line at this Service's address"
                )
        }
        securityGroupRules = rules
        self.findings = findings
    }
}
