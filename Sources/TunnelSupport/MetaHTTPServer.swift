import NIOCore
import NIOHTTP1
import NIOPosix

/// A response of the plain-HTTP meta endpoints.
public struct MetaResponse: Sendable {
    public var status: HTTPResponseStatus
    public var contentType: String
    public var body: [UInt8]

    public init(status: HTTPResponseStatus, contentType: String = "text/plain; charset=utf-8", body: [UInt8]) {
        self.status = status
        self.contentType = contentType
        self.body = body
    }

    public static func text(_ status: HTTPResponseStatus, _ text: String) -> MetaResponse {
        MetaResponse(status: status, body: Array((text + "\n").utf8))
    }
}

/// The small HTTP/1.1 server behind `/healthz`, `/readyz` and `/metrics` and `/v1/...` of server and agent.
/// Every request is answered by `route` (called on an event loop; it must not block).
///
/// Its port is reachable by anyone who can reach the pod (probes and Prometheus come from other hosts), so it is
/// bounded like every listener: a connection waits in `gate` until its first request head, and a connection that
/// sends nothing for `idleTimeout` (between keep-alive requests too) is closed.
public enum MetaHTTPServer {
    /// The gate of a meta port when none is given: 256 connections without a request from one address, 1,024 in
    /// all, 10 s to send the first head.
    public static func defaultGate() -> ConnectionGate {
        ConnectionGate(port: "meta", total: 1024, perSource: 256, deadline: .seconds(10)) { _, _ in }
    }

    public static func bind(
        host: String, port: Int, group: EventLoopGroup, gate: ConnectionGate = defaultGate(),
        idleTimeout: TimeAmount = .seconds(60),
        route: @escaping @Sendable (HTTPMethod, String) -> MetaResponse
    ) async throws -> Channel {
        try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)  // as the other listeners: a flood does not hold probes back
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(gate.handler())
                    try sync.addHandler(IdleStateHandler(readTimeout: idleTimeout))
                    try sync.addHandler(IdleCloser())
                    try sync.configureHTTPServerPipeline(withErrorHandling: true)
                    try sync.addHandler(MetaHandler(route: route))
                }
            }
            .bind(host: host, port: port).get()
    }
}

/// Closes its connection when the ``IdleStateHandler`` before it says nothing was read for its timeout.
final class IdleCloser: ChannelInboundHandler {
    typealias InboundIn = Any
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}

final class MetaHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let route: @Sendable (HTTPMethod, String) -> MetaResponse
    private var request: HTTPRequestHead?

    init(route: @escaping @Sendable (HTTPMethod, String) -> MetaResponse) {
        self.route = route
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            PendingConnectionHandler.authenticated(context.pipeline.syncOperations)
            request = head
        case .body:
            break
        case .end:
            guard let head = request else { return }
            request = nil
            let path = String(head.uri.split(separator: "?", maxSplits: 1).first ?? "")
            let response = route(head.method, path)
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: response.contentType)
            headers.add(name: "Content-Length", value: "\(response.body.count)")
            if !head.isKeepAlive { headers.add(name: "Connection", value: "close") }
            context.write(
                wrapOutboundOut(
                    .head(HTTPResponseHead(version: head.version, status: response.status, headers: headers))),
                promise: nil)
            if head.method != .HEAD {
                var body = context.channel.allocator.buffer(capacity: response.body.count)
                body.writeBytes(response.body)
                context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
            }
            let keepAlive = head.isKeepAlive
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
                if !keepAlive { context.close(promise: nil) }
            }
        }
    }
}
