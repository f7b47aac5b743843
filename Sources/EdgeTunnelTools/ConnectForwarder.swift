import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import TunnelPKI
import TunnelSupport
import TunnelWire

/// Opens a CONNECT stream for each accepted connection and relays bytes once the server answered 200.
public final class Forwarder: @unchecked Sendable {
    public enum Endpoint {
        /// The secure port, over TLS with a client certificate.
        case tls(HostPort, NIOSSLContext)
        /// The server's Unix socket: same host, no TLS.
        case unix(String)

        /// From the `--server`, `--ca-file`, `--cert` and `--key` options.
        public init(server: String, caFile: String?, cert: String?, key: String?) throws {
            if server.hasPrefix("unix:") {
                let path = String(server.dropFirst("unix:".count))
                guard !path.isEmpty else {
                    throw ConfigurationError("invalid --server \"\(server)\": expected unix:PATH")
                }
                self = .unix(path)
                return
            }
            guard let serverAddress = HostPort(authority: server) else {
                throw ConfigurationError("invalid --server \"\(server)\": expected HOST:PORT or unix:PATH")
            }
            guard let caFile, let cert, let key else {
                throw ConfigurationError("--ca-file, --cert and --key are required for a TLS --server")
            }
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.trustRoots = try TLSContexts.trustRoots(file: caFile)
            let (certificate, privateKey) = try PEMFiles.keyPair(certificate: cert, key: key)
            tls.certificateChain = [.certificate(try TLSContexts.nioCertificate(certificate))]
            tls.privateKey = .privateKey(try TLSContexts.nioKey(privateKey))
            self = .tls(serverAddress, try NIOSSLContext(configuration: tls))
        }
    }

    public let endpoint: Endpoint
    public let target: HostPort
    let logger: Logger

    public init(endpoint: Endpoint, target: HostPort, logger: Logger) {
        self.endpoint = endpoint
        self.target = target
        self.logger = logger
    }

    /// Connects to the server on `loop` and sends `CONNECT target`; once the server answered 200, `ready` runs
    /// (to add the handlers that take the stream's bytes) and the response handler is removed.
    public func openStream(
        on loop: EventLoop, ready: @escaping (Channel) throws -> Void = { _ in }
    ) -> EventLoopFuture<Channel> {
        let request = "CONNECT \(target) HTTP/1.1\r\nHost: \(target)\r\n\r\n"
        let connect = ConnectResponseHandler(request: request)
        let bootstrap = ClientBootstrap(group: loop)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelOption(.recvAllocator, value: SocketTuning.receiveAllocator)
        let connected: EventLoopFuture<Channel>
        switch endpoint {
        case .tls(let server, let tls):
            let hostname = IPAddress(server.host) == nil ? server.host : nil
            connected =
                bootstrap
                .channelOption(.tcpOption(.tcp_nodelay), value: 1)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            NIOSSLClientHandler(context: tls, serverHostname: hostname))
                        try channel.pipeline.syncOperations.addHandler(connect)
                    }
                }
                .connect(host: server.host, port: server.port)
        case .unix(let path):
            connected =
                bootstrap
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(connect)
                    }
                }
                .connect(unixDomainSocketPath: path)
        }
        return connected.flatMap { outbound in
            connect.established.flatMapThrowing { () -> Channel in
                try ready(outbound)
                outbound.pipeline.syncOperations.removeHandler(connect, promise: nil)
                return outbound
            }.flatMapErrorThrowing { error -> Channel in
                outbound.close(promise: nil)
                throw error
            }
        }
    }

    /// Relays an accepted connection (read with autoRead off) over its own CONNECT stream.
    public func accept(_ inbound: Channel) {
        let (localGlue, tunnelGlue) = RelayGlue.pair()
        // Both channels on the same loop: the glue relays between them without hops.
        openStream(on: inbound.eventLoop) { outbound in
            try inbound.pipeline.syncOperations.addHandler(localGlue)
            try outbound.pipeline.syncOperations.addHandler(tunnelGlue)
        }
        .flatMap { _ in
            // Reads were held until the stream existed; from now on the glue paces them.
            inbound.setOption(.autoRead, value: true)
        }
        .whenFailure { error in
            self.logger.warning("forward to \(self.target) failed: \(error)")
            inbound.close(promise: nil)
        }
    }
}

/// Sends the CONNECT request and waits for the status line; anything but 200 fails the stream.
final class ConnectResponseHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let request: String
    private var promise: EventLoopPromise<Void>?
    private var buffer = ByteBuffer()
    private var pending: EventLoopFuture<Void>?

    init(request: String) { self.request = request }

    var established: EventLoopFuture<Void> { pending! }

    func handlerAdded(context: ChannelHandlerContext) {
        let promise = context.eventLoop.makePromise(of: Void.self)
        self.promise = promise
        pending = promise.futureResult
    }

    func channelActive(context: ChannelHandlerContext) {
        var out = context.channel.allocator.buffer(capacity: request.utf8.count)
        out.writeString(request)
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard promise != nil else {
            context.fireChannelRead(data)
            return
        }
        var incoming = unwrapInboundIn(data)
        buffer.writeBuffer(&incoming)
        let view = buffer.readableBytesView
        guard let end = view.firstRange(of: Array("\r\n\r\n".utf8)) else {
            if buffer.readableBytes > 16384 { fail(context, "CONNECT response head too large") }
            return
        }
        let headLength = end.upperBound - view.startIndex
        let head = buffer.readString(length: headLength) ?? ""
        let statusLine = head.split(separator: "\r\n").first.map(String.init) ?? ""
        guard statusLine.split(separator: " ").dropFirst().first == "200" else {
            let body = buffer.readString(length: buffer.readableBytes) ?? ""
            fail(context, "server answered \(statusLine) \(body.trimmingCharacters(in: .whitespacesAndNewlines))")
            return
        }
        let leftover = buffer
        buffer = ByteBuffer()
        promise?.succeed(())
        promise = nil
        if leftover.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(leftover)) }
    }

    private func fail(_ context: ChannelHandlerContext, _ message: String) {
        promise?.fail(ForwardError(description: message))
        promise = nil
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise?.fail(ForwardError(description: "server closed the connection before answering CONNECT"))
        promise = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise?.fail(error)
        promise = nil
        context.close(promise: nil)
    }

    typealias InboundOut = ByteBuffer
}

public struct ForwardError: Error, CustomStringConvertible {
    public let description: String
}
