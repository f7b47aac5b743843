import ArgumentParser
import EdgePlan
import Foundation
import TunnelPKI
import TunnelSupport

struct ManifestsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "manifests",
        abstract: "Render the Kubernetes objects of an EdgeTunnel installation as YAML.",
        discussion: """
            The YAML goes to stdout; the commands that create the agents' bootstrap tokens (naming the edge \
            networks) go to stderr. With pools: one agent DaemonSet and one ConfigMap of server addresses per pool. \
            With --egress: only kube-apiserver's --egress-selector-config-file, for HTTPConnect (over TCP with \
            --egress-url, or a Unix socket) or GRPC (konnectivity's protocol, over the Unix socket --egress-uds).
            """
    )

    @Option(
        help: ArgumentHelp(
            "Instead of the cluster's objects: kube-apiserver's EgressSelectorConfiguration, http-connect or grpc.",
            valueName: "protocol"))
    var egress: String?
    @Option(
        name: .customLong("egress-uds"),
        help: "With --egress: the server's Unix socket (--grpc-uds-path or --uds-path) on the control plane host.")
    var egressUDS: String?
    @Option(
        name: .customLong("egress-url"),
        help: "With --egress http-connect: https://ADDRESS:10263, the ClusterIP of x-tunnel-server-internal-svc.")
    var egressURL: String?
    @Option(help: "internet (LoadBalancer Service) or express-connect (ClusterIP); with --pool, from the pools.")
    var mode: String?
    @Option(
        name: .customLong("pool"),
        help: ArgumentHelp(
            "An edge node pool (repeatable): NAME=express-connect|internet[,cidr=CIDR]...[,selector=KEY=VALUE|,selector-style=openyurt|ack].",
            valueName: "pool"))
    var pools: [String] = []
    @Option(
        help: "Plan file (edgetunnel plan --file) whose pools (or connectivity and edgeCIDRs) to render; flags win.")
    var file: String?
    @Option(
        name: .customLong("line-address"),
        help: "With pools: the address express-connect pools dial over the line (default: the line Service's name).")
    var lineAddress: String?
    @Option(
        name: .customLong("public-address"),
        help: "With an internet pool: the public HOST:PORT of x-tunnel-server-svc's load balancer.")
    var publicAddress: String?
    @Option(
        name: .customLong("edge-cidr"),
        help: "Without pools: an edge network, for the bootstrap token command (repeatable).")
    var edgeCIDRs: [String] = []
    @Option(help: "Container image (scripts/build-image builds the default).") var image = ManifestOptions.defaultImage
    @Option(help: "Namespace.") var namespace = "kube-system"
    @Option(help: "Server replicas.") var replicas = 2
    @Option(name: .customLong("server-address"), help: "Agents' server address HOST:PORT, in order (repeatable).")
    var serverAddresses: [String] = []
    @Option(name: .customLong("edge-node-selector"), help: "Label of edge nodes, key=value.")
    var edgeNodeSelector = "alibabacloud.com/is-edge-worker=true"
    @Option(
        name: .customLong("ca-secret"), help: "Secret with the tunnel CA (ca.crt, ca.key) mounted into every replica.")
    var caSecret = "edge-tunnel-ca"
    @Option(
        name: .customLong("pki-dir"),
        help: "PKI folder whose CA to render as that Secret (default: not rendered; see docs/DEPLOY.md).")
    var pkiDir: String?
    @Option(
        name: .customLong("join-state-namespace"), help: "Namespace of the ConfigMaps holding tokens and node records.")
    var joinStateNamespace = "edge-tunnel"
    @Option(
        name: .customLong("join-state-claim"),
        help: "Instead: a PersistentVolumeClaim for tokens.json and nodes.json, shared by the replicas.")
    var joinStateClaim: String?
    @Option(
        name: .customLong("join-state-storage-class"), help: "Storage class of that claim (default: the cluster's).")
    var joinStateStorageClass: String?
    @Option(name: .customLong("cert-ip"), help: "Address for the server certificate (repeatable).") var certIPs:
        [String] = []
    @Option(name: .customLong("cert-dns-name"), help: "DNS name for the server certificate (repeatable).")
    var certDNSNames: [String] = []
    @Option(name: .customLong("ca-cert-hash"), help: "CA pin for joining agents (edgetunnel pki ca-hash).")
    var caCertHash: String?

    func run() throws {
        try reportingErrors(userError: badInput) {
            if let egress {
                guard let proto = EgressSelector.ProxyProtocol(rawValue: egress) else {
                    throw PlanError("invalid --egress \"\(egress.prefix(100))\": expected http-connect or grpc")
                }
                print(try EgressSelector(proxyProtocol: proto, url: egressURL, uds: egressUDS).yaml, terminator: "")
                return
            }
            guard egressUDS == nil && egressURL == nil else {
                throw PlanError("--egress-uds and --egress-url go with --egress http-connect|grpc")
            }
            var fileInput = PlanFile()
            if let file {
                fileInput = try PlanFile.parse(String(decoding: try AtomicFile.read(file), as: UTF8.self), path: file)
            }
            let flagPools = try pools.map { try EdgePool(flag: $0) }
            let pools = flagPools.isEmpty ? (fileInput.pools ?? []) : flagPools
            var options: ManifestOptions
            if let mode = mode ?? fileInput.connectivity {
                options = ManifestOptions(mode: try Connectivity(parsing: mode))
                if options.mode != PlanInput.connectivity(of: pools),
                    let odd = pools.first(where: { $0.connectivity != options.mode })
                {
                    throw PlanError(
                        "--mode \(mode) contradicts pool \(odd.name) (\(odd.connectivity.rawValue)): with pools leave --mode out"
                    )
                }
            } else {
                guard !pools.isEmpty else {
                    throw PlanError("--mode is required: internet or express-connect (or give --pool)")
                }
                options = ManifestOptions(mode: PlanInput.connectivity(of: pools))
            }
            options.pools = pools
            options.lineAddress = lineAddress
            options.publicAddress = publicAddress
            let cidrs = edgeCIDRs.isEmpty && pools.isEmpty ? (fileInput.edgeCIDRs ?? []) : edgeCIDRs
            options.edgeCIDRs = try cidrs.map { try CIDR(parsing: $0) }
            options.image = image
            guard DNSName.isValid(namespace), !namespace.contains(".") else {
                throw PlanError("invalid --namespace \"\(namespace)\"")
            }
            options.namespace = namespace
            guard (1...100).contains(replicas) else { throw PlanError("--replicas must be 1-100, got \(replicas)") }
            options.replicas = replicas
            for address in serverAddresses where HostPort(authority: address) == nil {
                throw PlanError("invalid --server-address \"\(address)\": expected HOST:PORT")
            }
            options.serverAddresses = serverAddresses
            let selector = edgeNodeSelector.split(separator: "=", maxSplits: 1)
            guard selector.count == 2, !selector[0].isEmpty else {
                throw PlanError("invalid --edge-node-selector \"\(edgeNodeSelector)\": expected key=value")
            }
            options.edgeNodeSelector = (String(selector[0]), String(selector[1]))
            for (flag, name) in [
                ("--ca-secret", caSecret), ("--join-state-claim", joinStateClaim ?? "x"),
                ("--join-state-namespace", joinStateNamespace),
            ] where !DNSName.isValid(name) || name.contains(".") && flag == "--join-state-namespace" {
                throw PlanError("invalid \(flag) \"\(name)\": expected a Kubernetes object name")
            }
            // The server may change every ConfigMap there, and the manifests own that namespace.
            if joinStateClaim == nil,
                joinStateNamespace == namespace || joinStateNamespace == "default"
                    || joinStateNamespace.hasPrefix("kube-")
            {
                throw PlanError(
                    "invalid --join-state-namespace \"\(joinStateNamespace)\": it must be a namespace of its own, "
                        + "not default, kube-* or the server's --namespace")
            }
            options.caSecret = caSecret
            options.joinStateNamespace = joinStateNamespace
            options.joinStateClaim = joinStateClaim
            options.joinStateStorageClass = joinStateStorageClass
            if let pkiDir {
                let paths = PKIPaths(directory: pkiDir)
                // Checked as the server will load it: a CA certificate with its key.
                _ = try CertificateAuthority.load(from: paths)
                options.caFiles = (
                    String(decoding: try AtomicFile.read(paths.caCertificate), as: UTF8.self),
                    String(decoding: try AtomicFile.read(paths.caKey), as: UTF8.self)
                )
            }
            options.certIPs = certIPs
            options.certDNSNames = certDNSNames
            try options.validatePools()
            let names = options.certificateNames
            _ = try ServerSANs(ips: names.ips, dnsNames: names.dnsNames)
            options.caCertHash = try caCertHash.map { try CAHash.validate($0) }
            print(try Manifests.render(options), terminator: "")
            FileHandle.standardError.write(Data(Manifests.notes(options).utf8))
        }
    }
}
