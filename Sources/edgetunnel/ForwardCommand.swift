import ArgumentParser
import EdgeTunnelTools
import Foundation
import Logging
import NIOCore
import NIOPosix
import TunnelPKI
import TunnelSupport

/// `edgetunnel forward`: a local port that reaches NODE:PORT through the tunnel, like `kubectl port-forward`.
/// Each accepted connection becomes its own `CONNECT` stream on the server's secure port.
struct ForwardCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "forward",
        abstract: "Forward a local port to NODE:PORT through the tunnel (one CONNECT stream per connection)."
    )

    @Option(
        help:
            "The tunnel server's secure port HOST:PORT, unix:PATH for its Unix socket (--uds-path), or grpc:PATH for its gRPC socket (--grpc-uds-path)."
    )
    var server: String
    @Option(name: .customLong("ca-file"), help: "CA that signed the server's certificate (TLS only).") var caFile:
        String?
    @Option(help: "Client certificate for the secure port (TLS only).") var cert: String?
    @Option(help: "Key of the client certificate (TLS only).") var key: String?
    @Option(help: "Local address to listen on, HOST:PORT.") var listen: String = "127.0.0.1:0"
    @Option(help: "Destination NODE:PORT (a node name or a registered node IP).") var to: String

    func run() async throws {
        ProcessSupport.bootstrapLogging(level: .warning)
        let logger = Logger(label: "edgetunnel-forward")
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        if server.hasPrefix("grpc:") {
            return try await forwardOverGRPC(path: String(server.dropFirst(5)), group, logger)
        }
        let listener: Channel
        do {
            let endpoint = try Forwarder.Endpoint(server: server, caFile: caFile, cert: cert, key: key)
            guard let target = HostPort(authority: to) else {
                throw ConfigurationError("invalid --to \"\(to)\": expected NODE:PORT")
            }
            guard
                let local = HostPort(authority: listen)
                    ?? (listen.hasSuffix(":0") ? HostPort(host: String(listen.dropLast(2)), port: 0) : nil)
            else {
                throw ConfigurationError("invalid --listen \"\(listen)\": expected HOST:PORT")
            }
            let forwarder = Forwarder(endpoint: endpoint, target: target, logger: logger)
            listener = try await ServerBootstrap(group: group)
                .streamListener()
                .childChannelOption(.autoRead, value: false)
                .childChannelInitializer { channel in
                    forwarder.accept(channel)
                    return channel.eventLoop.makeSucceededVoidFuture()
                }
                .bind(host: local.host, port: local.port).get()
        } catch {
            printError("\(error)")
            throw ExitCode.failure
        }
        let bound = listener.localAddress
        print("forwarding \(bound?.ipAddress ?? "?"):\(bound?.port ?? 0) -> \(to) via \(server)")
        fflush(stdout)
        _ = await ProcessSupport.waitForSignal()
        try? await listener.close()
        try? await group.shutdownGracefully()
    }

    private func forwardOverGRPC(path: String, _ group: MultiThreadedEventLoopGroup, _ logger: Logger) async throws {
        guard let target = HostPort(authority: to), let local = HostPort(authority: listen) else {
            printError("invalid --to \"\(to)\" or --listen \"\(listen)\": expected HOST:PORT")
            throw ExitCode.failure
        }
        let (to, server) = (self.to, self.server)
        let forwarding = Task {
            try await GRPCForwarder.run(socketPath: path, listen: local, target: target, group: group, logger: logger) {
                print("forwarding \($0?.ipAddress ?? "?"):\($0?.port ?? 0) -> \(to) via \(server)")
                fflush(stdout)
            }
        }
        let stopped = Task {
            _ = await ProcessSupport.waitForSignal()
            forwarding.cancel()
        }
        defer { stopped.cancel() }
        do {
            try await forwarding.value
        } catch is CancellationError {
        } catch {
            printError("\(error)")
            throw ExitCode.failure
        }
        try? await group.shutdownGracefully()
    }
}
