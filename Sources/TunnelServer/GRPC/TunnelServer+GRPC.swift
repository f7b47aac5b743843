import GRPCCore
import GRPCNIOTransportHTTP2Posix
import NIOCore
import NIOPosix
import TunnelSupport

/// The gRPC frontend's listener (`--grpc-uds-path`): a Unix socket at mode 0600, bound here like `--uds-path`'s
/// and handed to grpc-swift's HTTP/2 transport already listening.
extension TunnelServer {
    struct GRPCListener {
        let server: GRPCServer<HTTP2ServerTransport.Posix>
        let serving: Task<Void, any Error>
        let frontend: GRPCFrontend
    }

    /// The largest DATA packet a client may send (gRPC's own default is 4 MiB). A packet waits whole for its
    /// stream's window, so this bounds what one connectID's client can make the server hold beyond it;
    /// kube-apiserver's konnectivity client sends what one read gave it, 32 KiB at a time.
    static let grpcMaxPacket = 1 << 20

    func startGRPC(path: String) async throws -> GRPCListener {
        guard let group = group as? MultiThreadedEventLoopGroup else {
            throw ConfigurationError("--grpc-uds-path needs the server to run on its own event loops")
        }
        let fd = try listeningUnixSocket(path: path, flag: "--grpc-uds-path")
        let frontend = GRPCFrontend(core: core, group: group)
        let limit = configuration.maxStreamsPerCaller
        let transport = HTTP2ServerTransport.Posix(
            listeningSocketDescriptor: Int(fd), transportSecurity: .plaintext,
            config: .defaults { config in
                config.rpc.maxRequestPayloadSize = Self.grpcMaxPacket
                // An RPC per dial at most: more could only wait for the caller's stream limit.
                config.http2.maxConcurrentStreams = limit
                // A window of its own per RPC, so that one slow reader does not slow the others; large enough for
                // a bulk transfer through a tunnel stream's window.
                config.http2.targetWindowSize = 1 << 20
            },
            eventLoopGroup: group)
        let server = GRPCServer(transport: transport, services: [frontend])
        let serving = Task { try await server.serve() }
        do {
            _ = try await transport.listeningAddress
        } catch {
            serving.cancel()
            throw ConfigurationError("--grpc-uds-path \(path): the gRPC server did not start (\(error))")
        }
        return GRPCListener(server: server, serving: serving, frontend: frontend)
    }
}
