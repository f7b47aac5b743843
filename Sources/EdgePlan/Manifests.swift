import TunnelPKI
import TunnelSupport
import Yams

/// What `edgetunnel manifests` renders from.
public struct ManifestOptions: Sendable {
    public var mode: Connectivity
    /// What `scripts/build-image` builds by default.
    public static let defaultImage = "localhost/edgetunnel:\(EdgeTunnelVersion.current)"
    public var image = Self.defaultImage
    public var namespace = "kube-system"
    public var replicas = 2
    /// Agents' server addresses, in order (e.g. the private-line address first, the public one second).
    public var serverAddresses: [String] = []
    /// Node label that marks edge nodes (`key=value`).
    public var edgeNodeSelector = (key: "alibabacloud.com/is-edge-worker", value: "true")
    /// The Secret holding the tunnel CA (`ca.crt`, `ca.key`), mounted read-only into every replica; each replica
    /// issues its own serving certificate from it into an emptyDir.
    public var caSecret = "edge-tunnel-ca"
    /// The CA's files, to render that Secret too (`--pki-dir`); nil: the operator creates it (docs/DEPLOY.md).
    public var caFiles: (certificatePEM: String, keyPEM: String)?
    /// The namespace whose ConfigMaps hold the join state (tokens' hashes, node records), which every replica
    /// watches; its own namespace, so that the server may write ConfigMaps there and nowhere else.
    public var joinStateNamespace = "edge-tunnel"
    /// Instead: a PersistentVolumeClaim every replica mounts for `tokens.json` and `nodes.json` (ReadWriteMany
    /// with several replicas).
    public var joinStateClaim: String?
    /// The claim's storage class; nil: the cluster's default.
    public var joinStateStorageClass: String?
    /// Addresses for the server certificate (certIPs / certDNSNames in its config).
    public var certIPs: [String] = []
    public var certDNSNames: [String] = []
    public var caCertHash: String?
    /// Edge node pools: one agent DaemonSet and one ConfigMap of server addresses each; empty: one DaemonSet on
    /// every node of `edgeNodeSelector`, its addresses `serverAddresses`.
    public var pools: [EdgePool] = []
    /// The address express-connect pools dial over the line (default: the line Service's in-cluster name).
    public var lineAddress: String?
    /// The public load balancer's address of `x-tunnel-server-svc`: internet pools dial it, line pools second.
    public var publicAddress: String?
    /// Without pools: the edge nodes' networks, which their bootstrap token must name (``Manifests/notes(_:)``).
    public var edgeCIDRs: [CIDR] = []

    public init(mode: Connectivity) { self.mode = mode }
}

/// Renders the Kubernetes objects of an EdgeTunnel installation as a multi-document YAML stream.
///
/// The Service `x-tunnel-server-svc` is exactly the one the source document shows (label
/// `name: edge-tunnel-server`, ports `https` 10263 and `tcp` 10262, selector `k8s-app: edge-tunnel-server`,
/// `sessionAffinity: None`), of type LoadBalancer on the internet and ClusterIP over a private line.
public enum Manifests {
    public static func render(_ o: ManifestOptions) throws -> String {
        let documents = objects(o)
        return try documents.map { try Yams.serialize(node: $0, width: -1) }.joined(separator: "---\n")
    }

    public static func objects(_ o: ManifestOptions) -> [Node] {
        let ns = o.namespace
        let serverLabels: Node = map([("k8s-app", s("edge-tunnel-server"))])
        let agentLabels: Node = map([("k8s-app", s("edge-tunnel-agent"))])
        // The replicas count each other by their Leases; serverCount is the count until the first list.
        // and the serving certificate names the Service's addresses as they change (LoadBalancer -> ClusterIP).
        var serverConfig =
            "pkiDir: /var/lib/edge-tunnel-server/\(o.joinStateClaim == nil ? "state" : "pki")\n"
            + "caDir: /etc/edge-tunnel/ca\nstateDir: /var/lib/edge-tunnel-server/state\n"
            + "serverCount: \(o.replicas)\nleaseNamespace: \(ns)\n"
            + "addressService: \(ns)/x-tunnel-server-svc,\(ns)/x-tunnel-server-internal-svc"
            + (o.pools.isEmpty ? "" : ",\(ns)/\(NetworkPlan.lineServiceName)") + "\ncheckNodeObjects: true\n"
        if o.joinStateClaim == nil { serverConfig += "joinStateNamespace: \(o.joinStateNamespace)\n" }
        // With pools the certificate also names every pool's server addresses.
        let (certIPs, certDNSNames) = o.certificateNames
        if !certIPs.isEmpty { serverConfig += "certIPs: [\(certIPs.joined(separator: ", "))]\n" }
        if !certDNSNames.isEmpty { serverConfig += "certDNSNames: [\(certDNSNames.joined(separator: ", "))]\n" }
        let addresses =
            o.serverAddresses.isEmpty
            ? ["x-tunnel-server-svc.\(ns).svc:10262"] : o.serverAddresses

        // With pools every pool has its own ConfigMap of addresses (Manifests+Pools.swift).
        var configData: [(String, Node)] =
            o.pools.isEmpty ? [("server-addresses", s(addresses.joined(separator: ",")))] : []
        configData.append(("server.yaml", s(serverConfig)))
        if let hash = o.caCertHash { configData.append(("ca-cert-hash", s(hash))) }

        let serviceAccountServer = object("v1", "ServiceAccount", "edge-tunnel-server", ns, labels: serverLabels)
        let serviceAccountAgent = object("v1", "ServiceAccount", "edge-tunnel-agent", ns, labels: agentLabels)
        let (joinStateObjects, role, binding, clusterRole, clusterBinding) = rbacObjects(o, labels: serverLabels)
        let configMap = object(
            "v1", "ConfigMap", "edge-tunnel-config", ns, labels: serverLabels,
            extra: [
                ("data", map(configData))
            ])
        let (service, callers, headless) = serviceObjects(o, labels: serverLabels)
        // The CA from a Secret (read-only, readable by the pod's group), this replica's own certificates in an
        // emptyDir, and the join state on a claim all replicas share.
        var serverVolumes: [Node] = [
            map([("name", s("ca")), ("secret", map([("secretName", s(o.caSecret)), ("defaultMode", n(0o440))]))]),
            map([("name", s("state")), ("emptyDir", map([("medium", s("Memory")), ("sizeLimit", s("1Mi"))]))]),
            map([("name", s("config")), ("configMap", map([("name", s("edge-tunnel-config"))]))]),
        ]
        var serverMounts: [Node] = [
            map([("name", s("ca")), ("mountPath", s("/etc/edge-tunnel/ca")), ("readOnly", b(true))]),
            map([("name", s("state")), ("mountPath", s("/var/lib/edge-tunnel-server/state"))]),
            map([("name", s("config")), ("mountPath", s("/etc/edge-tunnel/config")), ("readOnly", b(true))]),
        ]
        var joinStateClaim: [Node] = []
        if let claim = o.joinStateClaim {
            serverVolumes.append(
                map([("name", s("join-state")), ("persistentVolumeClaim", map([("claimName", s(claim))]))]))
            serverMounts.append(map([("name", s("join-state")), ("mountPath", s("/var/lib/edge-tunnel-server/pki"))]))
            var claimSpec: [(String, Node)] = [
                ("accessModes", seq([s(o.replicas > 1 ? "ReadWriteMany" : "ReadWriteOnce")])),
                ("resources", map([("requests", map([("storage", s("16Mi"))]))])),
            ]
            if let storageClass = o.joinStateStorageClass { claimSpec.append(("storageClassName", s(storageClass))) }
            joinStateClaim.append(
                object(
                    "v1", "PersistentVolumeClaim", claim, ns, labels: serverLabels, extra: [("spec", map(claimSpec))]))
        }
        let serverContainer = map([
            ("name", s("edge-tunnel-server")),
            ("image", s(o.image)),
            ("command", seq([s("edge-tunnel-server")])),
            ("args", seq([s("--config=/etc/edge-tunnel/config/server.yaml"), s("--server-id=$(POD_NAME)")])),
            (
                "env",
                seq([
                    map([
                        ("name", s("POD_NAME")),
                        ("valueFrom", map([("fieldRef", map([("fieldPath", s("metadata.name"))]))])),
                    ])
                ])
            ),
            (
                "ports",
                seq([
                    map([("name", s("tunnel")), ("containerPort", n(10262)), ("protocol", s("TCP"))]),
                    map([("name", s("https")), ("containerPort", n(10263)), ("protocol", s("TCP"))]),
                    map([("name", s("meta")), ("containerPort", n(10265)), ("protocol", s("TCP"))]),
                ])
            ),
            // Ready once every joined node holds a tunnel to this replica (at most replicaWarmup): the callers'
            // Service then sends it requests; the agents' Service publishes it before that.
            (
                "readinessProbe",
                map([("httpGet", map([("path", s("/readyz")), ("port", n(10265))])), ("periodSeconds", n(5))])
            ),
            (
                "livenessProbe",
                map([
                    ("httpGet", map([("path", s("/healthz")), ("port", n(10265))])), ("periodSeconds", n(10)),
                    ("failureThreshold", n(3)),
                ])
            ),
            (
                "resources",
                map([
                    ("requests", map([("cpu", s("100m")), ("memory", s("64Mi"))])),
                    ("limits", map([("memory", s("1Gi"))])),
                ])
            ),
            (
                "securityContext",
                map([
                    ("allowPrivilegeEscalation", b(false)), ("readOnlyRootFilesystem", b(true)),
                    ("capabilities", map([("drop", seq([s("ALL")]))])),
                ])
            ),
            ("volumeMounts", seq(serverMounts)),
        ])
        let deployment = object(
            "apps/v1", "Deployment", "edge-tunnel-server", ns, labels: serverLabels,
            extra: [
                (
                    "spec",
                    map([
                        ("replicas", n(o.replicas)),
                        ("selector", map([("matchLabels", serverLabels)])),
                        (
                            "strategy",
                            map([
                                ("type", s("RollingUpdate")),
                                ("rollingUpdate", map([("maxUnavailable", n(1)), ("maxSurge", n(1))])),
                            ])
                        ),
                        (
                            "template",
                            map([
                                ("metadata", map([("labels", serverLabels)])),
                                (
                                    "spec",
                                    map([
                                        ("serviceAccountName", s("edge-tunnel-server")),
                                        ("terminationGracePeriodSeconds", n(30)),
                                        // The image's own user; the volumes are its group's.
                                        (
                                            "securityContext",
                                            map([
                                                ("runAsNonRoot", b(true)), ("runAsUser", n(65532)),
                                                ("runAsGroup", n(65532)), ("fsGroup", n(65532)),
                                                ("seccompProfile", map([("type", s("RuntimeDefault"))])),
                                            ])
                                        ),
                                        (
                                            "affinity",
                                            map([
                                                (
                                                    "nodeAffinity",
                                                    map([
                                                        (
                                                            "requiredDuringSchedulingIgnoredDuringExecution",
                                                            map([
                                                                (
                                                                    "nodeSelectorTerms",
                                                                    seq([
                                                                        map([
                                                                            (
                                                                                "matchExpressions",
                                                                                seq([
                                                                                    map([
                                                                                        (
                                                                                            "key",
                                                                                            s(o.edgeNodeSelector.key)
                                                                                        ), ("operator", s("NotIn")),
                                                                                        (
                                                                                            "values",
                                                                                            seq([
                                                                                                s(
                                                                                                    o.edgeNodeSelector
                                                                                                        .value)
                                                                                            ])
                                                                                        ),
                                                                                    ])
                                                                                ])
                                                                            )
                                                                        ])
                                                                    ])
                                                                )
                                                            ])
                                                        )
                                                    ])
                                                ),
                                                // Replicas on different nodes where possible: one node's loss takes one replica.
                                                (
                                                    "podAntiAffinity",
                                                    map([
                                                        (
                                                            "preferredDuringSchedulingIgnoredDuringExecution",
                                                            seq([
                                                                map([
                                                                    ("weight", n(100)),
                                                                    (
                                                                        "podAffinityTerm",
                                                                        map([
                                                                            (
                                                                                "labelSelector",
                                                                                map([("matchLabels", serverLabels)])
                                                                            ),
                                                                            (
                                                                                "topologyKey",
                                                                                s("kubernetes.io/hostname")
                                                                            ),
                                                                        ])
                                                                    ),
                                                                ])
                                                            ])
                                                        )
                                                    ])
                                                ),
                                            ])
                                        ),
                                        ("containers", seq([serverContainer])),
                                        ("volumes", seq(serverVolumes)),
                                    ])
                                ),
                            ])
                        ),
                    ])
                )
            ])
        // A voluntary disruption (a node drain, a cluster upgrade) takes at most one replica at a time.
        let disruptionBudget = object(
            "policy/v1", "PodDisruptionBudget", "edge-tunnel-server", ns, labels: serverLabels,
            extra: [
                ("spec", map([("maxUnavailable", n(1)), ("selector", map([("matchLabels", serverLabels)]))]))
            ])
        var objects =
            joinStateObjects + [
                serviceAccountServer, serviceAccountAgent, role, binding, clusterRole, clusterBinding,
                configMap, service,
            ] + (o.pools.isEmpty ? [] : [lineService(o, labels: serverLabels)])
            + [callers, headless] + joinStateClaim + [deployment, disruptionBudget] + agentObjects(o)
        if let ca = o.caFiles {
            objects.insert(
                object(
                    "v1", "Secret", o.caSecret, ns, labels: serverLabels,
                    extra: [
                        ("type", s("Opaque")),
                        ("stringData", map([("ca.crt", s(ca.certificatePEM)), ("ca.key", s(ca.keyPEM))])),
                    ]), at: 0)
        }
        return objects
    }

    // MARK: Node builders

    static func object(
        _ apiVersion: String, _ kind: String, _ name: String, _ namespace: String, labels: Node,
        extra: [(String, Node)] = []
    ) -> Node {
        map(
            [
                ("apiVersion", s(apiVersion)), ("kind", s(kind)),
                ("metadata", map([("name", s(name)), ("namespace", s(namespace)), ("labels", labels)])),
            ] + extra)
    }

    static func clusterObject(
        _ apiVersion: String, _ kind: String, _ name: String, labels: Node, extra: [(String, Node)]
    ) -> Node {
        map(
            [
                ("apiVersion", s(apiVersion)), ("kind", s(kind)),
                ("metadata", map([("name", s(name)), ("labels", labels)])),
            ] + extra)
    }

    static func map(_ pairs: [(String, Node)]) -> Node {
        .mapping(Node.Mapping(pairs.map { (s($0.0), $0.1) }))
    }

    static func seq(_ items: [Node]) -> Node { .sequence(Node.Sequence(items)) }

    /// A string that stays a string: values that YAML would read as another type are double-quoted.
    static func s(_ value: String) -> Node {
        let lower = value.lowercased()
        let ambiguous =
            ["true", "false", "yes", "no", "on", "off", "null", "~", ""].contains(lower)
            || Double(value) != nil || value.contains(": ") || value.hasPrefix("*") || value.hasPrefix("&")
            || value.hasPrefix("!") || value.hasPrefix("%") || value.hasPrefix("@")
        if value.contains("\n") {
            return .scalar(.init(value, .init(.str), .literal))
        }
        return .scalar(.init(value, .init(.str), ambiguous ? .doubleQuoted : .plain))
    }

    static func n(_ value: Int) -> Node { .scalar(.init(String(value), .init(.int), .plain)) }
    static func b(_ value: Bool) -> Node { .scalar(.init(value ? "true" : "false", .init(.bool), .plain)) }
}
