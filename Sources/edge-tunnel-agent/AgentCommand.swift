import ArgumentParser
import Foundation
import Logging
import ServiceLifecycle
import TunnelAgent
import TunnelPKI
import TunnelSupport

/// `edge-tunnel-agent`: the edge side of EdgeTunnel.
@main
struct AgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "edge-tunnel-agent",
        abstract: "Dial out to the tunnel server and serve the cloud's streams to allowed edge endpoints.",
        version: EdgeTunnelVersion.current
    )

    @Option(name: .customLong("node-name"), help: "This node's name (default: $NODE_NAME, then the host name).")
    var nodeName: String?
    @Option(name: .customLong("node-ip"), help: "This node's IP (repeatable, or comma-separated; default: $NODE_IP).")
    var nodeIPs: [String] = []
    @Option(
        name: .customLong("server-address"),
        help: """
            Tunnel server HOST:PORT (repeatable; the first that works is used). Mark its path as private=HOST:PORT or \
            internet=HOST:PORT; unmarked, the first of several is the private line and the others the internet.
            """)
    var serverAddresses: [String] = []
    @Option(
        name: .customLong("server-addresses-file"),
        help: """
            File with the server addresses, one HOST:PORT a line in order of preference ('#' comments), marked as in \
            --server-address; watched, so a ConfigMap change moves the agent without a restart. Instead of --server-address.
            """)
    var serverAddressesFile: String?
    @Option(
        name: .customLong("pool"),
        help: """
            The edge pool this node is in, declared to the server (default: $EDGE_TUNNEL_POOL); a DNS label. A server \
            with --node-objects takes the Node's pool label instead.
            """)
    var pool: String?
    @Option(
        name: .customLong("pki-dir"),
        help: "Folder for the node's credentials (default /var/lib/edge-tunnel-agent/pki).")
    var pkiDir: String = PKIPaths.defaultAgentDirectory
    @Option(name: .customLong("bootstrap-token"), help: "Token to join with on first start (edgetunnel token create).")
    var bootstrapToken: String?
    @Option(
        name: .customLong("ca-cert-hash"),
        help: "sha256:<hex> pin of the tunnel CA for the join (edgetunnel pki ca-hash).")
    var caCertHash: String?
    @Option(
        name: .customLong("allow"),
        help: """
            Destination the cloud may reach (repeatable): host:port, IP:port, CIDR:port, or with a port range lo-hi. \
            Default: ports 10250 and 10255 on 127.0.0.1, ::1 and the node's IPs.
            """)
    var allow: [String] = []
    @Option(name: .customLong("meta-port"), help: "Port for /healthz, /readyz, /metrics (default 10266).")
    var metaPort: Int = 10266
    @Option(name: .customLong("meta-bind-address"), help: "Address of the meta port (default 127.0.0.1).")
    var metaBindAddress: String = "127.0.0.1"
    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"
    @Option(name: .customLong("log-format"), help: "text or json (one object a line).")
    var logFormat: String = "text"

    func run() async throws {
        let configuration: AgentConfiguration
        let level: Logger.Level
        let json: Bool
        do {
            (configuration, level) = try resolve()
            json = try ProcessSupport.parseLogFormat(logFormat)
        } catch {
            fail("\(error)")
        }
        ProcessSupport.bootstrapLogging(level: level, json: json)
        ProcessSupport.raiseFileLimit()
        ProcessSupport.tuneAllocator()
        let logger = Logger(label: "edge-tunnel-agent")
        let signals = await EarlySignals.trap()  // SIGTERM before the group runs: a graceful stop, not death
        let agent: EdgeTunnelAgent
        let service: AgentService
        do {
            agent = try EdgeTunnelAgent(configuration: configuration, logger: logger)
            service = AgentService(agent: agent, logger: logger)
            try await service.start()
        } catch {
            fail("\(error)")
        }
        var services: [any Service] = [service]
        if let path = serverAddressesFile {
            services.append(AddressesFileService(path: path, agent: agent, logger: logger))
        }
        let group = ServiceGroup(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        do {
            try await signals.run(group)
        } catch {
            fail("\(error)")
        }
    }

    private func resolve() throws -> (AgentConfiguration, Logger.Level) {
        let environment = ProcessInfo.processInfo.environment
        let name = nodeName ?? environment["NODE_NAME"] ?? ProcessInfo.processInfo.hostName.lowercased()
        var ipTexts = splitList(nodeIPs)
        if ipTexts.isEmpty, let fromEnvironment = environment["NODE_IP"] { ipTexts = splitList([fromEnvironment]) }
        let ips = try ipTexts.map { try IPAddress.parse($0) }
        var entries = splitList(serverAddresses)
        if let file = serverAddressesFile {
            guard entries.isEmpty else {
                throw ConfigurationError("give either --server-address or --server-addresses-file, not both")
            }
            entries = try readAddresses(file)
        }
        guard !entries.isEmpty else {
            throw ConfigurationError("at least one --server-address (or --server-addresses-file) is required")
        }
        let (addresses, marks) = try AddressPaths.parse(entries)
        let rules = try allow.map { try AllowList.Rule(parsing: $0) }
        var configuration = AgentConfiguration(
            nodeName: name, nodeIPs: ips, serverAddresses: addresses,
            allowList: rules.isEmpty ? nil : AllowList(rules: rules))
        configuration.addressPaths = marks
        // The downward API gives an empty value for a label the pod lacks: no pool.
        if let declared = pool ?? environment["EDGE_TUNNEL_POOL"].flatMap({ $0.isEmpty ? nil : $0 }) {
            configuration.pool = try PoolName.validate(declared, what: pool == nil ? "EDGE_TUNNEL_POOL" : "--pool")
        }
        configuration.pkiDirectory = pkiDir
        configuration.bootstrapToken = bootstrapToken ?? environment["BOOTSTRAP_TOKEN"]
        configuration.caCertHash = try caCertHash.map { try CAHash.validate($0) }
        if let token = configuration.bootstrapToken { _ = try BootstrapToken(parsing: token) }
        guard (0...65535).contains(metaPort) else { throw ConfigurationError("invalid --meta-port \(metaPort)") }
        configuration.metaPort = metaPort
        configuration.metaBindAddress = metaBindAddress
        guard let level = Logger.Level(flag: logLevel) else {
            throw ConfigurationError("invalid --log-level \"\(logLevel)\"")
        }
        return (configuration, level)
    }
}

/// The entries of an addresses file: one or more a line (comma-separated), '#' starts a comment; an entry may carry
/// its path (`private=HOST:PORT`, ``AddressPaths``).
func readAddresses(_ path: String) throws -> [String] {
    let text = String(decoding: try AtomicFile.read(path), as: UTF8.self)
    let lines = text.split(whereSeparator: \.isNewline).map { line -> String in
        String(line.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? "")
    }
    let addresses = splitList(lines)
    guard !addresses.isEmpty else { throw ConfigurationError("\(path): no server address in the file") }
    return addresses
}

func splitList(_ values: [String]) -> [String] { ProcessSupport.splitList(values) }

func fail(_ message: String) -> Never { ProcessSupport.fail("edge-tunnel-agent", message) }
