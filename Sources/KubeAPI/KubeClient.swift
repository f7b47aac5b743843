import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import TunnelSupport

/// A small client for the Kubernetes API on SwiftNIO: JSON requests, and watches streamed line by line. One
/// connection per request (the callers here ask every few seconds); the token is read anew for each.
///
/// As client-go does, an answer 429 or 5xx with `Retry-After` is asked again once that time has passed (a
/// request or a watch at most ``maxRetries`` times), and until then no request
/// of this process goes to that API server (``waitForRetryAfter()``). A 401 is asked again once, with the token
/// file read anew: a projected token rotated just as the request was built.
public final class KubeClient: @unchecked Sendable {
    public let config: KubeConfig
    private let group: EventLoopGroup
    private let tls: NIOSSLContext

    /// The largest answer accepted (a list of Leases or Nodes is far smaller), and the longest watch event line.
    static let maxBody = 16 << 20

    public struct Response: Sendable {
        public var status: Int
        public var body: [UInt8]
        /// The API server's `Retry-After` on a 429 or 5xx answer: how long to wait before asking again.
        public var retryAfter: TimeAmount? = nil
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        /// Set when the API server said when to ask again (`Retry-After`): the caller waits that long, not its
        /// own backoff.
        public var retryAfter: TimeAmount? = nil
        /// Set when the connection was lost after the answer's head had arrived (a reset, an end mid-body, no
        /// end within the timeout): a watch stream was cut there, and the events before the cut were delivered.
        public var cutMidAnswer = false
    }

    public init(config: KubeConfig, group: EventLoopGroup) throws {
        self.config = config
        self.group = group
        self.tls = try config.tlsContext()
    }

    /// `method path` with an optional JSON body; the status and body of the answer. A 429 or 5xx with
    /// `Retry-After` is asked again after that wait, ``maxRetries`` times at most; a 401 once.
    public func request(
        _ method: HTTPMethod, _ path: String, body: [UInt8]? = nil, timeout: TimeAmount = .seconds(10)
    )
        async throws -> Response
    {
        var retries = 0
        var reauthenticated = false
        while true {
            var collected: [UInt8] = []
            let (status, retryAfter) = try await exchange(method, path, body: body, timeout: timeout) { _, piece in
                guard collected.count + piece.readableBytes <= Self.maxBody else {
                    throw Failure(description: "the API server's answer to \(method) \(path) is larger than 16 MiB")
                }
                collected += piece.readableBytesView
            }
            if status == 401, !reauthenticated, config.tokenFile != nil {
                reauthenticated = true
                continue
            }
            if retryAfter != nil, retries < Self.maxRetries {
                retries += 1
                continue  // `exchange` waits for the Retry-After before it sends
            }
            return Response(status: status, body: collected, retryAfter: retryAfter)
        }
    }

    /// A watch (`path` with `watch=1`): each event line goes to `onEvent` as it arrives; returns the status when
    /// the server ends the stream (it does after its timeout), 200 or 410. An error thrown by `onEvent` ends the
    /// watch at once, with that error; a connection that fails is an error too, with ``Failure/cutMidAnswer`` set
    /// if the stream had begun. A watch refused with `Retry-After` (429, 5xx) is asked again after that wait
    /// (``maxRetries`` times at most), a 401 once; the body of a refusal is no event: any other refusal throws
    /// with the API's Status message (a 403 says which permission RBAC lacks).
    public func watch(
        _ path: String, timeout: TimeAmount, onEvent: @escaping @Sendable ([UInt8]) throws -> Void
    ) async throws -> Int {
        var retries = 0
        var reauthenticated = false
        while true {
            var line: [UInt8] = []
            var refusal: [UInt8] = []
            let (status, retryAfter) = try await exchange(.GET, path, body: nil, timeout: timeout) { status, piece in
                guard status == 200 else {  // a Status object, not events
                    if refusal.count + piece.readableBytes <= 64 << 10 { refusal += piece.readableBytesView }
                    return
                }
                for byte in piece.readableBytesView {
                    if byte == UInt8(ascii: "\n") {
                        if !line.isEmpty { try onEvent(line) }
                        line.removeAll(keepingCapacity: true)
                    } else {
                        line.append(byte)
                        guard line.count <= Self.maxBody else {
                            throw Failure(description: "a watch event is larger than 16 MiB")
                        }
                    }
                }
            }
            if status == 401, !reauthenticated, config.tokenFile != nil {
                reauthenticated = true
                continue
            }
            if retryAfter != nil, retries < Self.maxRetries {
                retries += 1
                continue
            }
            guard status == 200 || status == 410 else {
                let collection = path.split(separator: "?", maxSplits: 1).first.map(String.init) ?? path
                throw KubeWatch.failure(
                    Response(status: status, body: refusal, retryAfter: retryAfter), "watching \(collection)")
            }
            return status
        }
    }

    private func exchange(
        _ method: HTTPMethod, _ path: String, body: [UInt8]?, timeout: TimeAmount,
        onBody: @escaping (Int, ByteBuffer) throws -> Void
    ) async throws -> (status: Int, retryAfter: TimeAmount?) {
        try await waitForRetryAfter()
        let token = try config.currentToken()
        let loop = group.next()
        let done = loop.makePromise(of: (status: Int, retryAfter: TimeAmount?).self)
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
            let seconds = timeout.nanoseconds / 1_000_000_000
            done.fail(
                Failure(
                    description: "\(method) \(path): no complete answer within \(seconds) s",
                    cutMidAnswer: collector.hasHead))
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
        if let body {
            channel.write(HTTPClientRequestPart.body(.byteBuffer(channel.allocator.buffer(bytes: body))), promise: nil)
        }
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        defer { channel.close(promise: nil) }
        // A watch runs for a minute: a cancelled task (shutdown) ends it at once.
        let answer = try await withTaskCancellationHandler {
            try await done.futureResult.get()
        } onCancel: {
            done.fail(CancellationError())
            channel.close(promise: nil)
        }
        if let retryAfter = answer.retryAfter { holdRequests(for: retryAfter) }
        return answer
    }
}

/// Collects one response: its status, then its body piece by piece.
private final class ResponseCollector: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart
    private let done: EventLoopPromise<(status: Int, retryAfter: TimeAmount?)>
    private let onBody: (Int, ByteBuffer) throws -> Void
    private var status: Int?
    private var retryAfter: TimeAmount?
    private var finished = false

    init(
        done: EventLoopPromise<(status: Int, retryAfter: TimeAmount?)>,
        onBody: @escaping (Int, ByteBuffer) throws -> Void
    ) {
        self.done = done
        self.onBody = onBody
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !finished else { return }
        switch unwrapInboundIn(data) {
        case .head(let head):
            status = Int(head.status.code)
            retryAfter = KubeClient.retryAfter(
                status: Int(head.status.code), header: head.headers.first(name: "Retry-After"))
        case .body(let piece):
            do {
                try onBody(status ?? 0, piece)
            } catch {
                finish(.failure(error), context)
            }
        case .end:
            finish(.success((status ?? 0, retryAfter)), context)
        }
    }

    /// Whether the answer's head has arrived (read on the event loop).
    var hasHead: Bool { status != nil }

    func channelInactive(context: ChannelHandlerContext) {
        finish(
            .failure(
                KubeClient.Failure(
                    description: "the Kubernetes API closed the connection mid-answer", cutMidAnswer: hasHead)),
            context)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // The connection lost after the head (a reset, TLS or TCP ending mid-body) cut the answer there; any other
        // error (a malformed answer) stays what it is.
        let lost =
            error is IOError || error is NIOSSLError || error is ChannelError
            || (error as? HTTPParserError) == .invalidEOFState
        guard hasHead, lost else { return finish(.failure(error), context) }
        let cut = KubeClient.Failure(
            description: "the connection to the Kubernetes API failed mid-answer: \(error)", cutMidAnswer: true)
        finish(.failure(cut), context)
    }

    private func finish(
        _ result: Result<(status: Int, retryAfter: TimeAmount?), Error>, _ context: ChannelHandlerContext
    ) {
        guard !finished else { return }
        finished = true
        done.completeWith(result)
        context.close(promise: nil)
    }
}
