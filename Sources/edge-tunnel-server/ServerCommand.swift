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
        name: .customLong("grpc-uds-path"),
        help:
            "Unix socket (mode 0600) for kube-apiserver's egress selector in GRPC mode (konnectivity's protocol); off by default."
    )
    var grpcUdsPath: String?
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
        ProcessSupport.tuneAllocator()
        let logger = Logger(label: "edge-tunnel-server")
        let server: TunnelServer
        let service: TunnelServerService
        let signals: EarlySignals
        do {
            // SIGHUP is trapped once the service group runs (ConfigReloadService), after the listeners are up: one
            // that came in between killed the process (its default action). Ignored until then; a changed file is
            // still picked up by the reloader's watch.
            signal(SIGHUP, SIG_IGN)
            signals = await EarlySignals.trap()  // SIGTERM before the group runs: a graceful stop, not death
            server = try TunnelServer(configuration: configuration, logger: logger)
            service = TunnelServerService(server: server, logger: logger)
            try await service.start()
        } catch {
            fail("\(error)")
        }
        let reloader = config.map {
            ConfigReloader(
                path: $0, server: server, logger: logger, resolve: { [command = self] in try command.resolved($0) })
        }
        var services: [any Service] = [service]
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
            try await signals.run(group)
        } catch {
            fail("\(error)")
        }
    }

    /// The configuration from the flags and `file` (flags win).
    func resolved(_ file: ServerConfigFile) throws -> ServerConfiguration {
        try resolve(file).0
    }

    private func resolve(_ file: ServerConfigFile) throws -> (ServerConfiguration, Logger.Level) {
        try ServerConfiguration.resolve(flags: flags, file: file)
    }

    /// The flags given, in the file's shape: what is not given is nil, so the file's value shows through.
    var flags: ServerConfigFile {
        var flags = ServerConfigFile()
        (flags.pkiDir, flags.caDir, flags.stateDir, flags.bindAddress) = (pkiDir, caDir, stateDir, bindAddress)
        (flags.tunnelPort, flags.securePort, flags.metaPort) = (tunnelPort, securePort, metaPort)
        (flags.insecurePort, flags.insecureBindAddress, flags.udsPath) = (insecurePort, insecureBindAddress, udsPath)
        flags.grpcUdsPath = grpcUdsPath
        (flags.kubeletClientCert, flags.kubeletClientKey) = (kubeletClientCert, kubeletClientKey)
        (flags.kubeletCAFile, flags.clientCAFile, flags.serverID) = (kubeletCAFile, clientCAFile, serverID)
        let (ips, names, services) = (splitList(certIPs), splitList(certDNSNames), splitList(addressService))
        flags.certIPs = ips.isEmpty ? nil : ips
        flags.certDNSNames = names.isEmpty ? nil : names
        flags.addressService = services.isEmpty ? nil : services.joined(separator: ",")
        (flags.serverCount, flags.replicaWarmup, flags.leaseNamespace) = (serverCount, replicaWarmup, leaseNamespace)
        (flags.leaseLabel, flags.kubeconfig, flags.poolLabel) = (leaseLabel, kubeconfig, poolLabel)
        flags.checkNodeObjects = checkNodeObjects ? true : nil
        flags.allowInsecureBind = allowInsecureBind ? true : nil
        flags.joinStateNamespace = joinStateNamespace
        (flags.logLevel, flags.eventLoopThreads, flags.handshakeTimeout) = (
            logLevel, eventLoopThreads, handshakeTimeout
        )
        flags.agentCertificateValidity = agentCertificateValidity
        flags.servingCertificateValidity = servingCertificateValidity
        flags.maxPendingConnections = maxPendingConnections
        flags.maxPendingConnectionsPerSource = maxPendingConnectionsPerSource
        (flags.maxStreamsPerAgent, flags.maxPendingOpensPerAgent) = (maxStreamsPerAgent, maxPendingOpensPerAgent)
        (flags.maxStreamsPerCaller, flags.maxBufferedMiB) = (maxStreamsPerCaller, maxBufferedMiB)
        flags.resumeGraceSeconds = resumeGraceSeconds
        return flags
    }
}

func splitList(_ values: [String]) -> [String] { ProcessSupport.splitList(values) }

func fail(_ message: String) -> Never { ProcessSupport.fail("edge-tunnel-server", message) }
