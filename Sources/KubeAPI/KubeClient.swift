import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import TunnelSupport

/// A small client for the Kubernetes API on SwiftNIO: JSON requests, and watches streamed line by line. One
/// connection per request (the callers here ask every few seconds); the token is read anew for each.
public final class KubeClient: @unchecked Sendable {
    public let config: KubeConfig
    private let group: EventLoopGroup
    private let tls: NIOSSLContext

    /// The largest answer accepted (a list of Leases or Nodes is far smaller), and the longest watch event line.
    static let maxBody = 16 << 20

    public struct Response: Sendable {
        public var status: Int
        public var body: [UInt8]
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public init(config: KubeConfig, group: EventLoopGroup) throws {
        self.config = config
        self.group = group
        self.tls = try config.tlsContext()
    }

    /// `method path` with an optional JSON body; the status and body of the answer.
    public func request(_ method: HTTPMethod, _ path: String, body: [UInt8]? = nil, timeout: TimeAmount = .seconds(10))
        async throws -> Response
    {
        var collected: [UInt8] = []
        let status = try await exchange(method, path, body: body, timeout: timeout) { piece in
            guard collected.count + piece.readableBytes <= Self.maxBody else {
                throw Failure(description: "the API server's answer to \(method) \(path) is larger than 16 MiB")
            }
            collected += piece.readableBytesView
        }
        return Response(status: status, body: collected)
    }

    /// A watch (`path` with `watch=1`): each event line goes to `onEvent` as it arrives; returns the status when
    /// the server ends the stream (it does after its timeout) or the connection fails (an error). An error thrown
    /// by `onEvent` ends the watch at once, with that error.
    public func watch(_ path: String, timeout: TimeAmount, onEvent: @escaping @Sendable ([UInt8]) throws -> Void) async throws -> Int {
        var line: [UInt8] = []
        return try await exchange(.GET, path, body: nil, timeout: timeout) { piece in
            for byte in piece.readableBytesView {
                if byte == UInt8(ascii: "\n") {
                    if !line.isEmpty { try onEvent(line) }
                    line.removeAll(keepingCapacity: true)
                } else {
                    line.append(byte)
                    guard line.count <= Self.maxBody else { throw Failure(description: "a watch event is larger than 16 MiB") }
                }
            }
        }
    }

    private func exchange(
        _ method: HTTPMethod, _ path: String, body: [UInt8]?, timeout: TimeAmount,
        onBody: @escaping (ByteBuffer) throws -> Void
    ) async throws -> Int {
        let token = try config.currentToken()
        let loop = group.next()
        let done = loop.makePromise(of: Int.self)
        let collector = ResponseCollector(done: done, onBody: onBody)
        let tls = self.tls
        let channel: Channel
        do {
            channel = try await TLSClient.connect(
                host: config.host, port: config.port, on: loop, context: tls,
                serverHostname: TLSClient.serverName(for: config.host), within: .seconds(5))
            do {
                try await loop.submit {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHTTPClientHandlers()
                    try sync.addHandler(collector)
                }.get()
            } catch {
                channel.close(promise: nil)
                throw error
            }
        } catch {
            done.fail(error)
            throw Failure(description: "cannot reach the Kubernetes API at \(config.host):\(config.port): \(error)")
        }
        let timer = loop.scheduleTask(in: timeout) {
            done.fail(Failure(description: "\(method) \(path): no complete answer within \(timeout.nanoseconds / 1_000_000_000) s"))
            channel.close(promise: nil)
        }
        defer { timer.cancel() }
        var headers = HTTPHeaders()
        headers.add(name: "Host", value: config.host)
        headers.add(name: "Accept", value: "application/json")
        headers.add(name: "User-Agent", value: "edge-tunnel-server")
        if let token { headers.add(name: "Authorization", value: "Bearer \(token)") }
        if let body {
            headers.add(name: "Content-Type", value: "application/json")
            headers.add(name: "Content-Length", value: "\(body.count)")
        }
        let head = HTTPRequestHead(version: .http1_1, method: method, uri: path, headers: headers)
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        if let body { channel.write(HTTPClientRequestPart.body(.byteBuffer(channel.allocator.buffer(bytes: body))), promise: nil) }
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        defer { channel.close(promise: nil) }
        // A watch runs for a minute: a cancelled task (shutdown) ends it at once.
        return try await withTaskCancellationHandler {
            try await done.futureResult.get()
        } onCancel: {
            done.fail(CancellationError())
            channel.close(promise: nil)
        }
    }
}

/// Collects one response: its status, then its body piece by piece.
private final class ResponseCollector: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart
    private let done: EventLoopPromise<Int>
    private let onBody: (ByteBuffer) throws -> Void
    private var status: Int?
    private var finished = false

    init(done: EventLoopPromise<Int>, onBody: @escaping (ByteBuffer) throws -> Void) {
        self.done = done
        self.onBody = onBody
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !finished else { return }
        switch unwrapInboundIn(data) {
        case .head(let head):
            status = Int(head.status.code)
        case .body(let piece):
            do {
                try onBody(piece)
            } catch {
                finish(.failure(error), context)
            }
        case .end:
            finish(.success(status ?? 0), context)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish(.failure(KubeClient.Failure(description: "the Kubernetes API closed the connection mid-answer")), context)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        finish(.failure(error), context)
    }

    private func finish(_ result: Result<Int, Error>, _ context: ChannelHandlerContext) {
        guard !finished else { return }
        finished = true
        done.completeWith(result)
        context.close(promise: nil)
    }
}
