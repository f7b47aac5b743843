import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import Logging
import NIOCore
import NIOPosix
import TunnelServer
import TunnelSupport

/// `edgetunnel forward --server grpc:PATH`: a local port that reaches NODE:PORT through the server's gRPC frontend
/// (`--grpc-uds-path`), each accepted connection a Proxy RPC of its own on one gRPC connection, as newer
/// konnectivity clients dial. It is the benchmark's gRPC contender beside the CONNECT forwarder, and a way to try
/// the frontend by hand.
///
/// konnectivity's protocol has no half-close: the local connection's EOF ends the connectID (CLOSE_REQ), and the
/// target's end (CLOSE_RSP) closes the local connection.
public enum GRPCForwarder {
    /// Serves until cancelled; `ready` gets the bound address once connections are accepted.
    public static func run(
        socketPath: String, listen: HostPort, target: HostPort, group: MultiThreadedEventLoopGroup, logger: Logger,
        ready: @Sendable (NIOCore.SocketAddress?) -> Void
    ) async throws {
        let transport = try HTTP2ClientTransport.Posix(
            target: .unixDomainSocket(path: socketPath), transportSecurity: .plaintext,
            config: .defaults { $0.http2.targetWindowSize = 1 << 20 }, eventLoopGroup: group)
        let executor = EventLoopTaskExecutor(group.next())  // the forwarder runs one loop: its I/O's thread
        try await withGRPCClient(transport: transport) { client in
            let proxy = ProxyService.Client(wrapping: client)
            let listener = try await ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelOption(.allowRemoteHalfClosure, value: true)
                .bind(host: listen.host, port: listen.port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try NIOAsyncChannel<ByteBuffer, ByteBuffer>(
                            wrappingChannelSynchronously: channel,
                            configuration: .init(isOutboundHalfClosureEnabled: true))
                    }
                }
            ready(listener.channel.localAddress)
            try await withThrowingDiscardingTaskGroup { tasks in
                try await listener.executeThenClose { inbound in
                    for try await connection in inbound {
                        tasks.addTask(executorPreference: executor) {
                            do {
                                try await forward(connection, through: proxy, to: target)
                            } catch {
                                logger.warning("gRPC forward to \(target) ended: \(error)")
                            }
                        }
                    }
                }
                client.beginGracefulShutdown()
            }
        }
    }

    private static func forward(
        _ connection: NIOAsyncChannel<ByteBuffer, ByteBuffer>, through proxy: ProxyService.Client<some ClientTransport>,
        to target: HostPort
    ) async throws {
        try await connection.executeThenClose { inbound, outbound in
            let random = Int64.random(in: 1...Int64.max)
            let (granted, grant) = AsyncStream<Int64>.makeStream()
            try await proxy.proxy(
                requestProducer: { writer in
                    var dial = Packet()
                    dial.type = .dialReq
                    dial.dialRequest.protocol = "tcp"
                    dial.dialRequest.address = target.description
                    dial.dialRequest.random = random
                    try await writer.write(dial)
                    var grants = granted.makeAsyncIterator()
                    guard let connectID = await grants.next() else { return }
                    for try await bytes in inbound {
                        var packet = Packet()
                        packet.type = .data
                        packet.data.connectID = connectID
                        packet.data.data = Data(bytes.readableBytesView)
                        try await writer.write(packet)
                    }
                    var close = Packet()
                    close.type = .closeReq
                    close.closeRequest.connectID = connectID
                    try await writer.write(close)
                },
                onResponse: { response in
                    defer { grant.finish() }
                    for try await packet in response.messages {
                        switch packet.type {
                        case .dialRsp:
                            guard packet.dialResponse.error.isEmpty else {
                                throw ForwardError(description: "dial refused: \(packet.dialResponse.error)")
                            }
                            grant.yield(packet.dialResponse.connectID)
                        case .data:
                            try await outbound.write(ByteBuffer(bytes: packet.data.data))
                        case .closeRsp:
                            outbound.finish()
                            return
                        default:
                            break
                        }
                    }
                })
        }
    }
}
