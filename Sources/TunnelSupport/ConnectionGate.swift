import NIOConcurrencyHelpers
import NIOCore

/// Bounds the connections of one listener that have not authenticated yet (TLS handshake not done, or no
/// request head yet on a plain port): at most `perSource` from one source (``SourceKey``: an IPv4 address, an
/// IPv6 /64) and `total` in all. Without it,
/// thousands of sockets that never send a ClientHello hold descriptors until agents can no longer reconnect.
/// Thread-safe; one gate per listener, so a flood on one port never shuts agents out of another.
public final class ConnectionGate: @unchecked Sendable {
    /// Why a connection was turned away or cut off (the `reason` label of the rejection metric).
    public enum Rejection: String, Sendable {
        case sourceLimit = "source_limit"
        case totalLimit = "total_limit"
        case deadline = "handshake_timeout"
    }

    public let port: String
    public let total: Int
    public let perSource: Int
    public let deadline: TimeAmount
    private let lock = NIOLock()
    private var pending = 0
    private var bySource: [String: Int] = [:]
    private let onReject: @Sendable (_ port: String, _ reason: Rejection) -> Void

    /// - Parameters:
    ///   - port: names the listener in metrics and logs (`tunnel`, `secure`, `insecure`, `uds`, `meta`).
    ///   - onReject: counts a rejection (called on an event loop; must not block).
    public init(
        port: String, total: Int, perSource: Int, deadline: TimeAmount,
        onReject: @escaping @Sendable (_ port: String, _ reason: Rejection) -> Void
    ) {
        self.port = port
        self.total = total
        self.perSource = perSource
        self.deadline = deadline
        self.onReject = onReject
    }

    /// Connections of this listener that have not authenticated yet.
    public var pendingCount: Int { lock.withLock { pending } }

    func admit(_ source: String) -> Rejection? {
        let refused: Rejection? = lock.withLock {
            guard pending < total else { return .totalLimit }
            let count = bySource[source, default: 0]
            guard count < perSource else { return .sourceLimit }
            bySource[source] = count + 1
            pending += 1
            return nil
        }
        if let refused { onReject(port, refused) }
        return refused
    }

    func release(_ source: String) {
        lock.withLock {
            pending -= 1
            let count = bySource[source, default: 1] - 1
            bySource[source] = count > 0 ? count : nil
        }
    }

    func timedOut() { onReject(port, .deadline) }

    /// The handler that puts one connection through this gate: add it first in the child pipeline.
    public func handler() -> PendingConnectionHandler { PendingConnectionHandler(gate: self) }
}

/// Holds one connection in its listener's ``ConnectionGate`` until it authenticates: closed at once when the
/// gate is full, closed when ``ConnectionGate/deadline`` passes first. The protocol handler says when the
/// connection is authenticated (``authenticated(_:)``): the secure port once the TLS handshake with a client
/// certificate is done, the tunnel port once an agent certificate is accepted (a join without one stays
/// counted until it ends), plain ports once the request head is in. Then this handler leaves the pipeline, so
/// established connections pay nothing for it.
///
/// Add it first, before the TLS handler: its closes go straight to the socket. Through the TLS handler a close
/// waits for the peer's close_notify, which a peer that does not read never sends, and the descriptor stays.
public final class PendingConnectionHandler: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = Any

    private let gate: ConnectionGate
    private var source: String?
    private var timer: Scheduled<Void>?

    init(gate: ConnectionGate) { self.gate = gate }

    public func handlerAdded(context: ChannelHandlerContext) {
        // One IPv6 host could otherwise take the whole gate with addresses of its /64.
        let source = SourceKey.of(context.channel.remoteAddress?.ipAddress ?? "local")
        guard gate.admit(source) == nil else {
            context.close(promise: nil)
            return
        }
        self.source = source
        let gate = self.gate
        timer = context.eventLoop.scheduleTask(in: gate.deadline) {
            gate.timedOut()
            context.close(promise: nil)
        }
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        release()
    }

    public func channelInactive(context: ChannelHandlerContext) {
        release()
        context.fireChannelInactive()
    }

    private func release() {
        timer?.cancel()
        timer = nil
        guard let source else { return }
        self.source = nil
        gate.release(source)
    }

    /// A plain-port connection sent what authenticates it (its request head): it leaves the gate.
    public static func authenticated(_ pipeline: ChannelPipeline.SynchronousOperations) {
        guard let handler = try? pipeline.handler(type: PendingConnectionHandler.self) else { return }
        pipeline.removeHandler(handler, promise: nil)
    }
}
