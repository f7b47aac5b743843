import TunnelPKI
import TunnelSupport
import Yams

extension ManifestOptions {
    /// The line Service's in-cluster name: what express-connect pools dial when `lineAddress` is not given.
    public var defaultLineAddress: String { "\(NetworkPlan.lineServiceName).\(namespace).svc:10262" }

    /// The Service type of `x-tunnel-server-svc`: with pools LoadBalancer exactly when a pool is on the internet.
    public var serviceMode: Connectivity { pools.isEmpty ? mode : PlanInput.connectivity(of: pools) }

    /// The server addresses of a pool's agents, in order of preference: an express-connect pool dials the line
    /// first and the public address second (when the cluster has one); an internet pool the public address.
    public func serverAddresses(of pool: EdgePool) -> [String] {
        let line = lineAddress ?? defaultLineAddress
        switch pool.connectivity {
        case .expressConnect: return [line] + (publicAddress.map { [$0] } ?? [])
        case .internet: return publicAddress.map { [$0] } ?? []
        }
    }

    /// The text of a pool's addresses file: one address a line, with comments that say how to move the pool.
    public func addressesFile(of pool: EdgePool) -> String {
        let line = lineAddress ?? defaultLineAddress
        var text =
            "# Server addresses of edge pool \(pool.name) (\(pool.connectivity.rawValue)), in order of preference: its agents\n"
            + "# use the first that works and fail over to the next. They re-read this file: an edit moves them, no restart.\n"
        if pool.connectivity == .internet {
            text += "# To move the pool onto the private line, put the line address first:\n#   \(line)\n"
        } else if publicAddress != nil {
            text += "# To move the pool off the line, delete the line address (the first).\n"
        }
        return text + serverAddresses(of: pool).map { "\($0)\n" }.joined()
    }

    /// The certificate's extra addresses (certIPs, certDNSNames): those given, and every pool's server addresses.
    public var certificateNames: (ips: [String], dnsNames: [String]) {
        var ips = certIPs
        var names = certDNSNames
        guard !pools.isEmpty else { return (ips, names) }
        for address in [lineAddress ?? defaultLineAddress] + (publicAddress.map { [$0] } ?? []) {
            guard let host = HostPort(authority: address)?.host else { continue }
            if IPAddress(host) != nil {
                if !ips.contains(host) { ips.append(host) }
            } else if !names.contains(host) {
                names.append(host)
            }
        }
        return (ips, names)
    }

    /// Checks the pool options together; one line naming the value.
    public func validatePools() throws {
        if lineAddress != nil || publicAddress != nil, pools.isEmpty {
            throw PlanError(
                "--line-address and --public-address are the pools' addresses: give --pool too (or --server-address without pools)"
            )
        }
        guard !pools.isEmpty else { return }
        try EdgePool.validate(pools)
        if !serverAddresses.isEmpty {
            throw PlanError(
                "--server-address is the single DaemonSet's list: with pools give --line-address and --public-address")
        }
        if !edgeCIDRs.isEmpty {
            throw PlanError("--edge-cidr is the single DaemonSet's networks: with pools give each pool's as cidr=")
        }
        for (flag, address) in [("--line-address", lineAddress), ("--public-address", publicAddress)] {
            if let address, HostPort(authority: address) == nil {
                throw PlanError("invalid \(flag) \"\(address)\": expected HOST:PORT")
            }
        }
        let internet = pools.filter { $0.connectivity == .internet }
        if let pool = internet.first, publicAddress == nil {
            throw PlanError(
                "pool \(pool.name) is internet: give --public-address HOST:PORT, the load balancer address of "
                    + "x-tunnel-server-svc (or a DNS name for it) that its agents dial")
        }
        if internet.isEmpty, publicAddress != nil {
            throw PlanError(
                "--public-address: no pool is internet, so x-tunnel-server-svc is ClusterIP and has no public address")
        }
    }
}

extension Manifests {
    static let poolLabel = "edgetunnel.io/pool"

    /// The Service express-connect pools dial over the line: ClusterIP, port `tcp` 10262, replicas published
    /// before they are ready (agents attach first, as on x-tunnel-server-svc).
    static func lineService(_ o: ManifestOptions, labels: Node) -> Node {
        object(
            "v1", "Service", NetworkPlan.lineServiceName, o.namespace, labels: labels,
            extra: [
                (
                    "spec",
                    map([
                        ("type", s("ClusterIP")),
                        ("selector", labels),
                        (
                            "ports",
                            seq([
                                servicePort("tcp", 10262)
                            ])
                        ),
                        ("sessionAffinity", s("None")),
                        ("publishNotReadyAddresses", b(true)),
                    ])
                )
            ])
    }

    /// The agents: one DaemonSet without pools (edge nodes, `edge-tunnel-config`'s addresses, the Secret
    /// `edge-tunnel-bootstrap`), or per pool a ConfigMap of its addresses and a DaemonSet on its nodes.
    static func agentObjects(_ o: ManifestOptions) -> [Node] {
        let ns = o.namespace
        guard !o.pools.isEmpty else {
            return [
                agentDaemonSet(
                    o, name: "edge-tunnel-agent", labels: [("k8s-app", "edge-tunnel-agent")],
                    nodeSelector: [(o.edgeNodeSelector.key, o.edgeNodeSelector.value)],
                    addresses: ("edge-tunnel-config", "server-addresses"), bootstrapSecret: "edge-tunnel-bootstrap",
                    pool: nil)
            ]
        }
        return o.pools.flatMap { pool -> [Node] in
            let labels = [("k8s-app", "edge-tunnel-agent"), (poolLabel, pool.name)]
            let configMap = object(
                "v1", "ConfigMap", "edge-tunnel-pool-\(pool.name)", ns, labels: map(labels.map { ($0.0, s($0.1)) }),
                extra: [
                    ("data", map([("server-addresses", s(o.addressesFile(of: pool)))]))
                ])
            let daemonSet = agentDaemonSet(
                o, name: "edge-tunnel-agent-\(pool.name)", labels: labels,
                nodeSelector: pool.nodeSelector.sorted { $0.key < $1.key }.map { ($0.key, $0.value) },
                addresses: ("edge-tunnel-pool-\(pool.name)", "server-addresses"),
                bootstrapSecret: "edge-tunnel-bootstrap-\(pool.name)", pool: pool.name)
            return [configMap, daemonSet]
        }
    }

    /// An agent DaemonSet. Its server addresses are a file from a ConfigMap, which the agent re-reads: a
    /// ConfigMap edit moves its agents without a restart (an environment variable would need one).
    static func agentDaemonSet(
        _ o: ManifestOptions, name: String, labels: [(String, String)], nodeSelector: [(String, String)],
        addresses: (configMap: String, key: String), bootstrapSecret: String, pool: String?
    ) -> Node {
        let labelNode = map(labels.map { ($0.0, s($0.1)) })
        var args: [Node] = [
            s("--server-addresses-file=/etc/edge-tunnel/addresses/server-addresses"),
            s("--pki-dir=/var/lib/edge-tunnel-agent/pki"),
        ]
        func field(_ name: String, _ path: String) -> Node {
            map([("name", s(name)), ("valueFrom", map([("fieldRef", map([("fieldPath", s(path))]))]))])
        }
        var env: [Node] = [
            field("NODE_NAME", "spec.nodeName"),
            field("NODE_IP", "status.hostIP"),
            map([
                ("name", s("BOOTSTRAP_TOKEN")),
                (
                    "valueFrom",
                    map([
                        (
                            "secretKeyRef",
                            map([("name", s(bootstrapSecret)), ("key", s("token")), ("optional", b(true))])
                        )
                    ])
                ),
            ]),
        ]
        // The pool, for the agent to declare (from the pod's label, by the downward API).
        if pool != nil { env.append(field("EDGE_TUNNEL_POOL", "metadata.labels['\(poolLabel)']")) }
        if o.caCertHash != nil {
            env.append(
                map([
                    ("name", s("CA_CERT_HASH")),
                    (
                        "valueFrom",
                        map([("configMapKeyRef", map([("name", s("edge-tunnel-config")), ("key", s("ca-cert-hash"))]))])
                    ),
                ]))
            args.append(s("--ca-cert-hash=$(CA_CERT_HASH)"))
        }
        let container = map([
            ("name", s("edge-tunnel-agent")),
            ("image", s(o.image)),
            ("command", seq([s("edge-tunnel-agent")])),
            ("args", seq(args)),
            ("env", seq(env)),
            (
                "readinessProbe",
                map([
                    ("httpGet", map([("host", s("127.0.0.1")), ("path", s("/readyz")), ("port", n(10266))])),
                    ("periodSeconds", n(5)),
                ])
            ),
            (
                "livenessProbe",
                map([
                    ("httpGet", map([("host", s("127.0.0.1")), ("path", s("/healthz")), ("port", n(10266))])),
                    ("periodSeconds", n(10)),
                ])
            ),
            (
                "resources",
                map([
                    ("requests", map([("cpu", s("10m")), ("memory", s("16Mi"))])),
                    // The agent's stream buffers are bounded at 96 MiB (AgentConfiguration.bufferBudget); idle ~25.
                    ("limits", map([("memory", s("160Mi"))])),
                ])
            ),
            // Root, to write its identity into the node's hostPath (created root-owned by the kubelet), and no
            // capability beyond a file owner's.
            (
                "securityContext",
                map([
                    ("allowPrivilegeEscalation", b(false)), ("readOnlyRootFilesystem", b(true)), ("runAsUser", n(0)),
                    ("capabilities", map([("drop", seq([s("ALL")]))])),
                    ("seccompProfile", map([("type", s("RuntimeDefault"))])),
                ])
            ),
            (
                "volumeMounts",
                seq([
                    map([("name", s("pki")), ("mountPath", s("/var/lib/edge-tunnel-agent/pki"))]),
                    map([
                        ("name", s("addresses")), ("mountPath", s("/etc/edge-tunnel/addresses")), ("readOnly", b(true)),
                    ]),
                ])
            ),
        ])
        return object(
            "apps/v1", "DaemonSet", name, o.namespace, labels: labelNode,
            extra: [
                (
                    "spec",
                    map([
                        ("selector", map([("matchLabels", labelNode)])),
                        (
                            "updateStrategy",
                            map([("type", s("RollingUpdate")), ("rollingUpdate", map([("maxUnavailable", s("10%"))]))])
                        ),
                        (
                            "template",
                            map([
                                ("metadata", map([("labels", labelNode)])),
                                (
                                    "spec",
                                    map([
                                        ("serviceAccountName", s("edge-tunnel-agent")),
                                        // The agent reaches the kubelet on the node's own addresses.
                                        ("hostNetwork", b(true)),
                                        ("dnsPolicy", s("ClusterFirstWithHostNet")),
                                        ("nodeSelector", map(nodeSelector.map { ($0.0, s($0.1)) })),
                                        ("tolerations", seq([map([("operator", s("Exists"))])])),
                                        ("terminationGracePeriodSeconds", n(30)),
                                        ("containers", seq([container])),
                                        (
                                            "volumes",
                                            seq([
                                                map([
                                                    ("name", s("pki")),
                                                    (
                                                        "hostPath",
                                                        map([
                                                            ("path", s("/var/lib/edge-tunnel-agent/pki")),
                                                            ("type", s("DirectoryOrCreate")),
                                                        ])
                                                    ),
                                                ]),
                                                // Only the addresses: the agent sees nothing else of the ConfigMap.
                                                map([
                                                    ("name", s("addresses")),
                                                    (
                                                        "configMap",
                                                        map([
                                                            ("name", s(addresses.configMap)),
                                                            (
                                                                "items",
                                                                seq([
                                                                    map([
                                                                        ("key", s(addresses.key)),
                                                                        ("path", s("server-addresses")),
                                                                    ])
                                                                ])
                                                            ),
                                                        ])
                                                    ),
                                                ]),
                                            ])
                                        ),
                                    ])
                                ),
                            ])
                        ),
                    ])
                )
            ])
    }

    /// What to do after `kubectl apply`, as shell lines and `#` comments (the CLI prints it on stderr, so that the
    /// YAML on stdout stays clean): the commands that create each DaemonSet's bootstrap token, naming the
    /// networks its nodes' addresses lie in, and store it in the Secret the DaemonSet reads.
    public static func notes(_ o: ManifestOptions) -> String {
        let ns = o.namespace
        let state =
            o.joinStateClaim == nil
            ? "--join-state-namespace \(o.joinStateNamespace)" : "--pki-dir /var/lib/edge-tunnel-server/pki"
        var lines = [
            "# Bootstrap tokens: an agent claims its node's status.hostIP, and a join accepts it only inside the token's",
            "# --node-cidr networks. Once the server runs, create the token and the Secret its DaemonSet reads:",
        ]
        func command(secret: String, cidrs: [CIDR], description: String, placeholder: String) -> String {
            let networks = cidrs.isEmpty ? ["--node-cidr \(placeholder)"] : cidrs.map { "--node-cidr \($0)" }
            return "kubectl -n \(ns) create secret generic \(secret) --from-literal=token=\"$(kubectl -n \(ns) exec "
                + "deploy/edge-tunnel-server -- edgetunnel token create \(state) \(networks.joined(separator: " ")) "
                + "--description \(description))\""
        }
        if o.pools.isEmpty {
            if o.edgeCIDRs.isEmpty {
                lines.append(
                    "# No --edge-cidr was given: put the edge nodes' networks in place of EDGE-CIDR (repeat --node-cidr)."
                )
            }
            lines.append(
                command(
                    secret: "edge-tunnel-bootstrap", cidrs: o.edgeCIDRs, description: "edge-agents",
                    placeholder: "EDGE-CIDR"))
        } else {
            for pool in o.pools {
                if pool.cidrs.isEmpty {
                    lines.append("# Pool \(pool.name) has no cidr=: put its nodes' networks in place of POOL-CIDR.")
                }
                lines.append(
                    command(
                        secret: "edge-tunnel-bootstrap-\(pool.name)", cidrs: pool.cidrs,
                        description: "edge-pool-\(pool.name)",
                        placeholder: "POOL-CIDR"))
            }
            lines.append(
                "# Tokens expire after 24 h by default: nodes added later need a new one (token create --ttl sets the lifetime)."
            )
            lines.append("# Moving a pool between the internet and the private line is one edit of its addresses, e.g.")
            lines.append("#   kubectl -n \(ns) edit configmap edge-tunnel-pool-\(o.pools[0].name)")
            lines.append("# its agents re-read the file (the kubelet updates it within about a minute): no restart.")
            lines.append("# Replacing the single agent DaemonSet: kubectl -n \(ns) delete daemonset edge-tunnel-agent")
        }
        return lines.joined(separator: "\n") + "\n"
    }
}
