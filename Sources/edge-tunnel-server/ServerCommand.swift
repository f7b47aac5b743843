import ArgumentParser
import Foundation
import Logging
import ServiceLifecycle
import TunnelPKI
import TunnelServer
import TunnelSupport
import Yams

#if canImport(Glibc)
import Glibc
#endif

/// `edge-tunnel-server`: the cloud side of EdgeTunnel.
@main
struct ServerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "edge-tunnel-server",
        abstract: "Accept agents' tunnels and route cloud callers to edge nodes through them.",
        discussion: """
            Every flag can also be set in a YAML file given with --config, with the flag's name in camelCase \
            (pkiDir, bindAddress, tunnelPort, securePort, metaPort, certIPs, certDNSNames, clientCAFile, \
            serverID, logLevel, agentCertificateValidity). A flag on the command line wins over the file.
            """,
        version: EdgeTunnelVersion.current
    )

    @Option(help: "YAML configuration file.") var config: String?
    @Option(
        name: .customLong("pki-dir"), help: "PKI folder with the tunnel CA (default /var/lib/edge-tunnel-server/pki).")
    var pkiDir: String?
    @Option(
        name: .customLong("ca-dir"),
        help: "Folder with ca.crt and ca.key when not the PKI folder, e.g. a Secret mounted read-only.")
    var caDir: String?
    @Option(
        name: .customLong("state-dir"),
        help: "Folder of this replica's own serving and kubelet client certificates (default: the PKI folder).")
    var stateDir: String?
    @Option(name: .customLong("bind-address"), help: "Address to listen on (default 0.0.0.0).") var bindAddress: String?
    @Option(name: .customLong("tunnel-port"), help: "Port for agents' tunnels (default 10262).") var tunnelPort: Int?
    @Option(name: .customLong("secure-port"), help: "Port for cloud callers' CONNECT over TLS (default 10263).")
    var securePort: Int?
    @Option(name: .customLong("meta-port"), help: "Port for /healthz, /readyz, /metrics, /v1/agents (default 10265).")
    var metaPort: Int?
    @Option(
        name: .customLong("insecure-port"), help: "Port for plain-HTTP Host routing (default 10264; 0 turns it off).")
    var insecurePort: Int?
    @Option(name: .customLong("insecure-bind-address"), help: "Address of the insecure port (default 127.0.0.1).")
    var insecureBindAddress: String?
    @Option(
        name: .customLong("uds-path"),
        help: "Unix socket (mode 0600) for CONNECT from a co-located caller; off by default.")
    var udsPath: String?
    @Option(
        name: .customLong("kubelet-client-cert"),
        help: "Proxy-client certificate for kubelets (default: issued from the tunnel CA).")
    var kubeletClientCert: String?
    @Option(name: .customLong("kubelet-client-key"), help: "Key of --kubelet-client-cert.")
    var kubeletClientKey: String?
    @Option(
        name: .customLong("kubelet-ca-file"),
        help: "CA of the kubelets' serving certificates (default: not verified, logged).")
    var kubeletCAFile: String?
    @Option(
        name: .customLong("cert-ips"),
        help: "IP the server is reached at, for its certificate (repeatable, or comma-separated).")
    var certIPs: [String] = []
    @Option(
        name: .customLong("cert-dns-names"), help: "DNS name the server is reached at (repeatable, or comma-separated)."
    )
    var certDNSNames: [String] = []
    @Option(name: .customLong("client-ca-file"), help: "CA for callers on the secure port (default: the tunnel CA).")
    var clientCAFile: String?
    @Option(name: .customLong("server-id"), help: "Name of this replica (default: the host name).") var serverID:
        String?
    @Option(
        name: .customLong("server-count"),
        help:
            "Server replicas behind the agents' server address; every agent keeps a tunnel to each (default 1). Reloadable."
    )
    var serverCount: Int?
    @Option(
        name: .customLong("replica-warmup"),
        help:
            "With several replicas: unready until every joined node holds a tunnel here, at most this long (default 60s)."
    )
    var replicaWarmup: String?
    @Option(
        name: .customLong("lease-namespace"),
        help:
            "Count the replicas by their coordination.k8s.io Leases in this namespace (each replica holds one); overrides --server-count."
    )
    var leaseNamespace: String?
    @Option(
        name: .customLong("lease-label"),
        help: "The label of the replicas' Leases (default k8s-app=edge-tunnel-server).")
    var leaseLabel: String?
    @Option(
        name: .customLong("address-service"),
        help:
            "NAMESPACE/NAME of a Service the server is reached through (repeatable, or comma-separated): its addresses join the certificate's SANs, live."
    )
    var addressService: [String] = []
    @Flag(
        name: .customLong("node-objects"),
        help:
            "Agents register only as existing Node objects, claiming only their Node's addresses; a deleted Node's tunnel closes."
    )
    var checkNodeObjects = false
    @Option(
        name: .customLong("pool-label"),
        help:
            "With --node-objects: the Node label that names a node's edge pool (default apps.openyurt.io/nodepool; alibabacloud.com/nodepool-id is read too). It wins over the pool an agent declares."
    )
    var poolLabel: String?
    @Option(
        name: .customLong("join-state-namespace"),
        help:
            "Keep bootstrap tokens and node records as ConfigMaps in this namespace, seen by every replica (default: the PKI folder)."
    )
    var joinStateNamespace: String?
    @Option(
        name: .customLong("kubeconfig"),
        help: "A kubeconfig for the Kubernetes API (default: the pod's service account).")
    var kubeconfig: String?
    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String?
    @Option(name: .customLong("log-format"), help: "text or json (one object a line).")
    var logFormat: String = "text"
    @Option(name: .customLong("agent-certificate-validity"), help: "Lifetime of agent certificates (default 720h).")
    var agentCertificateValidity: String?
    @Option(
        name: .customLong("serving-certificate-validity"), help: "Lifetime of the server's certificate (default 8760h)."
    )
    var servingCertificateValidity: String?
    @Option(
        name: .customLong("event-loop-threads"), help: "Event-loop threads (default: half the CPU cores, at least 1).")
    var eventLoopThreads: Int?
    @Option(
        name: .customLong("handshake-timeout"),
        help: "Time a connection has to finish its TLS handshake or send its request head (default 10s).")
    var handshakeTimeout: String?
    @Option(
        name: .customLong("max-pending-connections"),
        help: "Connections per listener still in their handshake, in all (default 4096).")
    var maxPendingConnections: Int?
    @Option(
        name: .customLong("max-pending-connections-per-source"),
        help: "Connections per listener still in their handshake, per source IP (default 256).")
    var maxPendingConnectionsPerSource: Int?
    @Option(name: .customLong("max-streams-per-agent"), help: "Streams open at once through one agent (default 20000).")
    var maxStreamsPerAgent: Int?
    @Option(
        name: .customLong("max-pending-opens-per-agent"),
        help: "Streams to one agent waiting for its answer (default 1024).")
    var maxPendingOpensPerAgent: Int?
    @Option(
        name: .customLong("max-streams-per-caller"),
        help: "Streams open at once for one caller identity (default 20000).")
    var maxStreamsPerCaller: Int?
    @Option(name: .customLong("max-buffered-mib"), help: "Receive windows over all tunnels, in MiB (default 512).")
    var maxBufferedMiB: Int?
    @Option(
        name: .customLong("resume-grace-seconds"),
        help:
            "How long an agent's streams wait for it to reconnect and resume them after its connection is lost (default 30; 0: they end at once)."
    )
    var resumeGraceSeconds: Int?
    @Flag(
        name: .customLong("allow-insecure-bind"),
        help: "Let --insecure-bind-address be a non-loopback address: the insecure port has no authentication.")
    var allowInsecureBind = false

    func run() async throws {
        let configuration: ServerConfiguration
        let level: Logger.Level
        let json: Bool
        do {
            let file = try config.map(ServerConfigFile.load) ?? ServerConfigFile()
            (configuration, level) = try resolve(file)
            json = try ProcessSupport.parseLogFormat(logFormat)
        } catch {
            fail("\(error)")
        }
        ProcessSupport.bootstrapLogging(level: level, json: json)
        ProcessSupport.raiseFileLimit()
        let logger = Logger(label: "edge-tunnel-server")
        let server: TunnelServer
        do {
            // SIGHUP is trapped once the service group runs (ConfigReloadService), after the listeners are up: one
            // that came in between killed the process (its default action). Ignored until then; a changed file is
            // still picked up by the reloader's watch.
            signal(SIGHUP, SIG_IGN)
            server = try TunnelServer(configuration: configuration, logger: logger)
            try await server.start()
        } catch {
            fail("\(error)")
        }
        let reloader = config.map {
            ConfigReloader(
                path: $0, server: server, logger: logger, resolve: { [command = self] in try command.resolved($0) })
        }
        var services: [any Service] = [TunnelServerService(server: server, logger: logger)]
        do {
            if let namespace = configuration.leaseNamespace {
                services.append(
                    try ReplicaLeaseService(
                        configuration: configuration, namespace: namespace, server: server, logger: logger))
            }
            if let namespace = configuration.joinStateNamespace {
                services.append(
                    try JoinStateService(
                        configuration: configuration, namespace: namespace, server: server, logger: logger))
            }
            if configuration.checkNodeObjects {
                services.append(try NodeObjectsService(configuration: configuration, server: server, logger: logger))
            }
            for service in configuration.addressServices {
                services.append(
                    try ServiceAddressService(
                        configuration: configuration, service: service, server: server, logger: logger))
            }
        } catch {
            fail("\(error)")
        }
        services.append(ConfigReloadService(reloader: reloader, logger: logger))
        let group = ServiceGroup(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        do {
            try await group.run()
        } catch {
            fail("\(error)")
        }
    }

    /// The configuration from the flags and `file` (flags win).
    func resolved(_ file: ServerConfigFile) throws -> ServerConfiguration {
        try resolve(file).0
    }

    private func resolve(_ file: ServerConfigFile) throws -> (ServerConfiguration, Logger.Level) {
        var configuration = ServerConfiguration()
        configuration.pkiDirectory = pkiDir ?? file.pkiDir ?? configuration.pkiDirectory
        configuration.caDirectory = caDir ?? file.caDir
        configuration.stateDirectory = stateDir ?? file.stateDir
        configuration.bindAddress = bindAddress ?? file.bindAddress ?? configuration.bindAddress
        configuration.tunnelPort = try port(tunnelPort ?? file.tunnelPort ?? configuration.tunnelPort, "tunnel-port")
        configuration.securePort = try port(securePort ?? file.securePort ?? configuration.securePort, "secure-port")
        configuration.metaPort = try port(metaPort ?? file.metaPort ?? configuration.metaPort, "meta-port")
        configuration.insecurePort = try port(
            insecurePort ?? file.insecurePort ?? configuration.insecurePort, "insecure-port")
        configuration.insecureBindAddress =
            insecureBindAddress ?? file.insecureBindAddress ?? configuration.insecureBindAddress
        configuration.udsPath = udsPath ?? file.udsPath
        configuration.kubeletClientCert = kubeletClientCert ?? file.kubeletClientCert
        configuration.kubeletClientKey = kubeletClientKey ?? file.kubeletClientKey
        configuration.kubeletCAFile = kubeletCAFile ?? file.kubeletCAFile
        let ips = splitList(certIPs)
        let names = splitList(certDNSNames)
        configuration.certIPs = ips.isEmpty ? (file.certIPs ?? []) : ips
        configuration.certDNSNames = names.isEmpty ? (file.certDNSNames ?? []) : names
        configuration.clientCAFile = clientCAFile ?? file.clientCAFile
        configuration.serverID = serverID ?? file.serverID ?? configuration.serverID
        // Agents read it in a line before TLS (ReplicaProbe) and it names the replica's Lease: a pod name.
        guard (1...253).contains(configuration.serverID.utf8.count),
            configuration.serverID.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-._".contains($0)) })
        else {
            throw ConfigurationError(
                "invalid --server-id \"\(configuration.serverID)\": must be 1-253 letters, digits, '-', '.' or '_'")
        }
        if let count = serverCount ?? file.serverCount {
            guard (1...1000).contains(count) else {
                throw ConfigurationError("invalid --server-count \(count): must be 1-1000")
            }
            configuration.serverCount = count
        }
        configuration.leaseNamespace = leaseNamespace ?? file.leaseNamespace
        configuration.kubeconfig = kubeconfig ?? file.kubeconfig
        configuration.checkNodeObjects = checkNodeObjects || (file.checkNodeObjects ?? false)
        if let key = poolLabel ?? file.poolLabel {
            guard PoolName.isLabelKey(key) else {
                throw ConfigurationError(
                    "invalid --pool-label \"\(key)\": must be a label key such as apps.openyurt.io/nodepool")
            }
            configuration.poolLabel = key
        }
        if let namespace = joinStateNamespace ?? file.joinStateNamespace {
            guard DNSName.isValid(namespace), !namespace.contains(".") else {
                throw ConfigurationError("invalid --join-state-namespace \"\(namespace)\": must be a namespace name")
            }
            configuration.joinStateNamespace = namespace
        }
        let services = splitList(addressService)
        for service in services.isEmpty ? splitList(file.addressService.map { [$0] } ?? []) : services {
            let parts = service.split(separator: "/", omittingEmptySubsequences: false)
            guard parts.count == 2,
                parts.allSatisfy({
                    !$0.isEmpty && $0.allSatisfy { $0.isLowercase || $0.isNumber || $0 == "-" || $0 == "." }
                })
            else { throw ConfigurationError("invalid --address-service \"\(service)\": must be namespace/name") }
            if !configuration.addressServices.contains(service) { configuration.addressServices.append(service) }
        }
        if let label = leaseLabel ?? file.leaseLabel {
            let parts = label.split(separator: "=", omittingEmptySubsequences: false)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty,
                label.allSatisfy({ $0.isLetter || $0.isNumber || "-_./=".contains($0) })
            else { throw ConfigurationError("invalid --lease-label \"\(label)\": must be key=value") }
            configuration.leaseLabel = label
        }
        if let warmup = replicaWarmup ?? file.replicaWarmup {
            let seconds = try Durations.parse(warmup, what: "--replica-warmup")
            guard (0...3600).contains(seconds) else {
                throw ConfigurationError("--replica-warmup must be between 0s and 1h")
            }
            configuration.replicaWarmup = .milliseconds(Int64(seconds * 1000))
        }
        if let threads = eventLoopThreads ?? file.eventLoopThreads {
            guard (1...256).contains(threads) else {
                throw ConfigurationError("invalid --event-loop-threads \(threads): must be 1-256")
            }
            configuration.eventLoopThreads = threads
        }
        if let timeout = handshakeTimeout ?? file.handshakeTimeout {
            let seconds = try Durations.parse(timeout, what: "--handshake-timeout")
            guard (1...300).contains(seconds) else {
                throw ConfigurationError("--handshake-timeout must be between 1s and 300s")
            }
            configuration.handshakeTimeout = .milliseconds(Int64(seconds * 1000))
        }
        if let total = maxPendingConnections ?? file.maxPendingConnections {
            guard total >= 1 else {
                throw ConfigurationError("invalid --max-pending-connections \(total): must be at least 1")
            }
            configuration.maxPendingConnections = total
        }
        if let perSource = maxPendingConnectionsPerSource ?? file.maxPendingConnectionsPerSource {
            guard perSource >= 1 else {
                throw ConfigurationError(
                    "invalid --max-pending-connections-per-source \(perSource): must be at least 1")
            }
            configuration.maxPendingConnectionsPerSource = perSource
        }
        configuration.allowInsecureBind = allowInsecureBind || (file.allowInsecureBind ?? false)
        func positive(_ value: Int?, _ flag: String) throws -> Int? {
            guard let value else { return nil }
            guard value >= 1 else { throw ConfigurationError("invalid --\(flag) \(value): must be at least 1") }
            return value
        }
        if let value = resumeGraceSeconds ?? file.resumeGraceSeconds {
            guard (0...600).contains(value) else {
                throw ConfigurationError("invalid --resume-grace-seconds \(value): must be between 0 and 600")
            }
            configuration.resumeGrace = .seconds(Int64(value))
        }
        if let value = try positive(maxStreamsPerAgent ?? file.maxStreamsPerAgent, "max-streams-per-agent") {
            configuration.maxStreamsPerAgent = value
        }
        if let value = try positive(
            maxPendingOpensPerAgent ?? file.maxPendingOpensPerAgent, "max-pending-opens-per-agent")
        {
            configuration.maxPendingOpensPerAgent = value
        }
        if let value = try positive(maxStreamsPerCaller ?? file.maxStreamsPerCaller, "max-streams-per-caller") {
            configuration.maxStreamsPerCaller = value
        }
        if let value = try positive(maxBufferedMiB ?? file.maxBufferedMiB, "max-buffered-mib") {
            guard value <= 1 << 20 else { throw ConfigurationError("invalid --max-buffered-mib \(value): too large") }
            configuration.maxBufferedBytes = value << 20
        }
        if let validity = agentCertificateValidity ?? file.agentCertificateValidity {
            let seconds = try Durations.parse(validity, what: "--agent-certificate-validity")
            guard seconds >= 10 else {
                throw ConfigurationError("--agent-certificate-validity must be at least 10s")
            }
            configuration.agentCertificateValidity = seconds
        }
        if let validity = servingCertificateValidity ?? file.servingCertificateValidity {
            let seconds = try Durations.parse(validity, what: "--serving-certificate-validity")
            guard seconds >= 10 else {
                throw ConfigurationError("--serving-certificate-validity must be at least 10s")
            }
            configuration.servingCertificateValidity = seconds
        }
        let levelText = logLevel ?? file.logLevel ?? "info"
        guard let level = Logger.Level(flag: levelText) else {
            throw ConfigurationError("invalid --log-level \"\(levelText)\"")
        }
        // Check addresses now, so a typo is reported as such rather than as a certificate problem.
        _ = try ServerSANs(ips: configuration.certIPs, dnsNames: configuration.certDNSNames)
        return (configuration, level)
    }

    private func port(_ value: Int, _ name: String) throws -> Int {
        guard (0...65535).contains(value) else {
            throw ConfigurationError("invalid --\(name) \(value): must be 0-65535")
        }
        return value
    }
}

func splitList(_ values: [String]) -> [String] { ProcessSupport.splitList(values) }

func fail(_ message: String) -> Never { ProcessSupport.fail("edge-tunnel-server", message) }
