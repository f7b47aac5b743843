import ArgumentParser
import EdgeTunnelTools
import Foundation
import Logging
import NIOPosix
import ServiceLifecycle
import TunnelAgent
import TunnelPKI
import TunnelServer
import TunnelSupport

/// The README's main job: a whole EdgeTunnel on loopback in one process, with nothing installed.
struct DemoCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract:
            "Run a tunnel server, an agent named demo-edge and an edge service on loopback, and reach the service through the tunnel.",
        discussion: """
            A fresh PKI is made in a temporary folder (removed when the demo ends); the agent joins with a bootstrap token. The command prints \
            the curl command that reaches the edge service through the tunnel, runs the request once, and keeps \
            running until Ctrl-C.
            """
    )

    @Option(name: .customLong("pki-dir"), help: "Folder for the demo PKI (default: a new temporary folder).")
    var directory: String?
    @Option(name: .customLong("tunnel-port"), help: "Tunnel port (agents).") var tunnelPort = 10262
    @Option(name: .customLong("secure-port"), help: "Port for CONNECT over TLS.") var securePort = 10263
    @Option(name: .customLong("meta-port"), help: "Server meta port.") var metaPort = 10265
    @Option(name: .customLong("agent-meta-port"), help: "Agent meta port.") var agentMetaPort = 10266
    @Flag(help: "Exit after the first request instead of running until Ctrl-C.") var once = false

    func run() async throws {
        ProcessSupport.bootstrapLogging(level: .warning)
        let logger = Logger(label: "edgetunnel-demo")
        do {
            try await runDemo(logger: logger)
        } catch {
            printError("\(error)")
            throw ExitCode.failure
        }
    }

    private func runDemo(logger: Logger) async throws {
        let folder =
            directory ?? (NSTemporaryDirectory() + "edgetunnel-demo-\(UUID().uuidString.prefix(8).lowercased())")
        // A folder the demo made for itself goes when it ends (after Ctrl-C too): it holds a CA's private key.
        defer { if directory == nil { try? FileManager.default.removeItem(atPath: folder) } }
        let paths = PKIPaths(directory: folder + "/server")
        if AtomicFile.exists(paths.caCertificate) {
            throw PKIError(.alreadyExists, "\(paths.caCertificate) already exists; give an empty --pki-dir")
        }
        let ca = try CertificateAuthority.create()
        try ca.write(to: paths)
        let operatorCredential = try ca.issueClientCertificate(commonName: "demo-operator")
        let operatorCert = paths.file("demo-operator.crt")
        let operatorKey = paths.file("demo-operator.key")
        try operatorCredential.write(certificatePath: operatorCert, keyPath: operatorKey)
        let (token, _) = try TokenStore(paths: paths).create(ttl: 3600, description: "demo")

        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let edge = try await DemoEdgeService.bind(host: "127.0.0.1", port: 0, nodeName: "demo-edge", group: group)
        let edgePort = edge.localAddress?.port ?? 0

        var serverConfiguration = ServerConfiguration()
        serverConfiguration.pkiDirectory = paths.directory
        serverConfiguration.bindAddress = "127.0.0.1"
        serverConfiguration.tunnelPort = tunnelPort
        serverConfiguration.securePort = securePort
        serverConfiguration.metaPort = metaPort
        serverConfiguration.insecurePort = 0
        serverConfiguration.serverID = "demo-server"
        // Kubelets' serving certificates verified against the demo's own CA: the demo has no kubelet, and a server
        // without a kubelet CA warns on every start that it verifies none.
        serverConfiguration.kubeletCAFile = paths.caCertificate
        let server = TunnelServerService(
            server: try TunnelServer(configuration: serverConfiguration, logger: logger, group: group), logger: logger)

        var agentConfiguration = AgentConfiguration(
            nodeName: "demo-edge", nodeIPs: [], serverAddresses: ["127.0.0.1:\(tunnelPort)"],
            allowList: AllowList(rules: [try AllowList.Rule(parsing: "127.0.0.1:\(edgePort)")]))
        agentConfiguration.pkiDirectory = folder + "/agent"
        agentConfiguration.bootstrapToken = token.description
        agentConfiguration.caCertHash = try ca.publicKeyHash
        agentConfiguration.metaPort = agentMetaPort
        let agent = AgentService(
            agent: try EdgeTunnelAgent(configuration: agentConfiguration, logger: logger, group: group), logger: logger)
        // Started here, so that a port in use or a refused join is reported before anything is printed; the group
        // below runs them, turns Ctrl-C (or the end of --once) into one graceful shutdown, and stops the agent
        // first (the last service first), then the server.
        try await server.start()
        try await agent.start()
        let services = ServiceGroup(
            configuration: .init(
                services: [.init(service: server), .init(service: agent)],
                gracefulShutdownSignals: [.sigint, .sigterm], logger: logger))
        async let running: Void = services.run()
        guard await agent.agent.waitUntilConnected(within: .seconds(10)) else {
            await services.triggerGracefulShutdown()
            try? await running
            throw ConfigurationError("the demo agent did not connect in 10s")
        }

        let curl = [
            "curl", "--proxy-cacert", paths.caCertificate, "--proxy-cert", operatorCert, "--proxy-key", operatorKey,
            "-p", "-x", "https://127.0.0.1:\(securePort)", "http://demo-edge:\(edgePort)/",
        ]
        print(
            """
            EdgeTunnel demo is running (PKI in \(folder)).
              server:  agents on 127.0.0.1:\(tunnelPort), CONNECT on https://127.0.0.1:\(securePort), \
            meta on http://127.0.0.1:\(metaPort)
              agent:   node demo-edge, joined with a bootstrap token, meta on http://127.0.0.1:\(agentMetaPort)
              edge:    a stand-in kubelet on 127.0.0.1:\(edgePort), reachable only through the tunnel's allow list

            Reach the edge service through the tunnel:
              \(curl.joined(separator: " "))

            Connected agents:  edgetunnel status --server http://127.0.0.1:\(metaPort)

            """)
        print("Running it once:")
        fflush(stdout)
        let ok = runOnce(curl)
        if once || !ok {
            await services.triggerGracefulShutdown()
        } else {
            print("\nPress Ctrl-C to stop.")
            fflush(stdout)  // shown at once when the output is a pipe or a file too
        }
        try await running
        try? await edge.close()
        try? await group.shutdownGracefully()
        if !ok { throw ExitCode.failure }
    }

    /// Runs the printed curl command and shows its output.
    private func runOnce(_ command: [String]) -> Bool {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = command + ["-sS", "--max-time", "10"]
        do {
            try process.run()
            process.waitUntilExit()
        } catch {
            print("  (cannot run curl: \(error); install curl to try the command above)")
            return true
        }
        return process.terminationStatus == 0
    }
}
