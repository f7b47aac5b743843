import NIOConcurrencyHelpers
import NIOCore

/// Bounds the connections of one listener that have not authenticated yet (TLS handshake not done, or no
/// request head yet on a plain port): at most `perSource` from one source (``SourceKey``: an IPv4 address, an
/// IPv6 /64) and `total` in all. Without it,
/// thousands of sockets that never send a ClientHello hold descriptors until agents can no longer reconnect.
/// Thread-safe; one gate per listener, so a flood on one port never shuts agents out of another.
///
/// **Overload.** A gate built with an `overloadTarget` (the TLS listeners) also keeps the handshakes it admits
/// short enough to finish. Without that, a reconnect storm larger than the cores can serve within the deadline
/// is congestion collapse: every handshake in flight slows down together, most are cut at the deadline after
/// their work is done, and their agents redial into the same queue. Each second the gate looks at the quickest
/// authentication of that second, from accept to done; quick ones mean queueing is not the problem. When even
/// the quickest took longer than the target, the cores are the queue, and the gate admits only as many as it
/// saw complete per second times the target (Little's law), never fewer than `overloadFloor`. The surplus is
/// closed at once, which costs almost nothing and sends an agent into its backoff. Every other second doubles
/// the limit back up to `total`.
///
/// The verdict resists a peer that games it. A client decides when its own handshake finishes, so a second
/// counts as overloaded only with at least ``overloadSamples`` authentications in it, all slow: one slow peer
/// (a stolen certificate, a satellite link, an agent holding a probe) is not enough while anyone is quick.
/// Connections that stall without authenticating teach the gate nothing, and a second without enough
/// authentications lets the limit grow, so stalled connections cannot keep it down. While the limit is lowered,
/// one source may hold only an eighth of it.
public final class ConnectionGate: @unchecked Sendable {
    /// Why a connection was turned away or cut off (the `reason` label of the rejection metric).
    public enum Rejection: String, Sendable {
        case sourceLimit = "source_limit"
        case totalLimit = "total_limit"
        case overload = "overload"
        case deadline = "handshake_timeout"
    }

    public let port: String
    public let total: Int
    public let perSource: Int
    public let deadline: TimeAmount
    /// The quickest authentication of a second above which the gate lowers its limit; nil: no overload control.
    public let overloadTarget: TimeAmount?
    /// The lowest the overload control takes the limit.
    public let overloadFloor: Int
    static let overloadInterval = TimeAmount.seconds(1)
    /// The fewest authentications in a second that can make it an overloaded one.
    static let overloadSamples = 8
    private let lock = NIOLock()
    private var pending = 0
    private var bySource: [String: Int] = [:]
    private var limit: Int
    private var windowStart: NIODeadline?
    private var windowCompleted = 0
    private var windowQuickest: TimeAmount?
    private let onReject: @Sendable (_ port: String, _ reason: Rejection) -> Void
    private let onAuthenticated: (@Sendable (_ port: String) -> Void)?

    /// - Parameters:
    ///   - port: names the listener in metrics and logs (`tunnel`, `secure`, `insecure`, `uds`, `meta`).
    ///   - overloadTarget: see the type's "Overload"; nil on plain ports, where the time to a request head is the
    ///     caller's and not the cores'.
    ///   - onAuthenticated: counts a connection that authenticated (called on an event loop; must not block).
    ///   - onReject: counts a rejection (called on an event loop; must not block).
    public init(
        port: String, total: Int, perSource: Int, deadline: TimeAmount, overloadTarget: TimeAmount? = nil,
        onAuthenticated: (@Sendable (_ port: String) -> Void)? = nil,
        onReject: @escaping @Sendable (_ port: String, _ reason: Rejection) -> Void
    ) {
        self.port = port
        self.total = total
        self.perSource = perSource
        self.deadline = deadline
        self.overloadTarget = overloadTarget
        self.overloadFloor = min(total, max(perSource > Int.max / 2 ? Int.max : 2 * perSource, 64))
        self.limit = total
        self.onReject = onReject
        self.onAuthenticated = onAuthenticated
    }

    /// Connections of this listener that have not authenticated yet.
    public var pendingCount: Int { lock.withLock { pending } }

    /// How many unauthenticated connections the gate admits now: `total`, or lower under overload.
    public var admissionLimit: Int { lock.withLock { limit } }

    func admit(_ source: String, at now: NIODeadline = .now()) -> Rejection? {
        let refused: Rejection? = lock.withLock {
            guard pending < total else { return .totalLimit }
            rollWindow(now)  // without an overload target the limit stays `total`
            guard pending < limit else { return .overload }
            let count = bySource[source, default: 0]
            guard count < perSource, limit == total || count < max(1, limit / 8) else { return .sourceLimit }
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

    /// A connection admitted `latency` ago authenticated.
    func authenticated(after latency: TimeAmount, at now: NIODeadline = .now()) {
        onAuthenticated?(port)
        guard overloadTarget != nil else { return }
        lock.withLock {
            rollWindow(now)
            windowCompleted += 1
            windowQuickest = min(windowQuickest ?? latency, latency)
        }
    }

    /// Closes the second that has passed, if one has, and sets the limit from it (under `lock`).
    private func rollWindow(_ now: NIODeadline) {
        guard let target = overloadTarget else { return }
        guard let start = windowStart else {
            windowStart = now
            return
        }
        let elapsed = now - start
        guard elapsed >= Self.overloadInterval else { return }
        // A window stretched by an idle gap says nothing about now.
        if elapsed <= Self.overloadInterval * 3, windowCompleted >= Self.overloadSamples,
            let quickest = windowQuickest, quickest > target
        {
            let perSecond = Double(windowCompleted) * 1e9 / Double(elapsed.nanoseconds)
            let fits = Int(min(perSecond * Double(target.nanoseconds) / 1e9, Double(total)))
            limit = max(overloadFloor, min(limit, fits))
        } else {
            limit = limit > total / 2 ? total : limit * 2
        }
        windowStart = now
        windowCompleted = 0
        windowQuickest = nil
    }

    /// The handler that puts one connection through this gate: add it first in the child pipeline.
    public func handler() -> PendingConnectionHandler { PendingConnectionHandler(gate: self) }
}

/// Holds one connection in its listener's ``ConnectionGate`` until it authenticates: closed at once when the
/// gate is full, closed when ``ConnectionGate/deadline`` passes first. The protocol handler says when the
/// connection is authenticated (``authenticated(_:)``): the secure port once the TLS handshake with a client
/// certificate is done, the tunnel port once an agent's HELLO is accepted (a join without a certificate
/// stays counted until it ends), plain ports once the request head is in. Then this handler leaves the pipeline, so
/// established connections pay nothing for it.
///
/// Add it first, before the TLS handler: its closes go straight to the socket. Through the TLS handler a close
/// waits for the peer's close_notify, which a peer that does not read never sends, and the descriptor stays.
public final class PendingConnectionHandler: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = Any

    private let gate: ConnectionGate
    private var source: String?
    private var admittedAt: NIODeadline?
    private var timer: Scheduled<Void>?

    init(gate: ConnectionGate) { self.gate = gate }

    public func handlerAdded(context: ChannelHandlerContext) {
        // One IPv6 host could otherwise take the whole gate with addresses of its /64.
        let source = SourceKey.of(context.channel.remoteAddress?.ipAddress ?? "local")
        let now = context.eventLoop.now
        guard gate.admit(source, at: now) == nil else {
            context.close(promise: nil)
            return
        }
        self.source = source
        admittedAt = now
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

    /// The connection authenticated (a client certificate accepted, or on a plain port its request head): it
    /// leaves the gate, and the time it took tells the gate about overload unless `timed` is false (a
    /// certificate that will not be served: it must not weigh on the verdict).
    public static func authenticated(_ pipeline: ChannelPipeline.SynchronousOperations, timed: Bool = true) {
        guard let handler = try? pipeline.handler(type: PendingConnectionHandler.self) else { return }
        if timed, let admittedAt = handler.admittedAt, handler.source != nil {
            let now = pipeline.eventLoop.now
            handler.gate.authenticated(after: now - admittedAt, at: now)
        }
        pipeline.removeHandler(handler, promise: nil)
    }
}
