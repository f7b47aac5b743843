import Atomics
import NIOCore

/// Many streams over one tunnel connection, each with its own flow-control window.
///
/// Sits on the tunnel channel after the TLS handler, a ``FrameDecoder`` and a
/// ``FrameEncoder``. Each stream pairs with a socket through a ``StreamGlue``; bytes move between them as
/// `ByteBuffer`s without copies, and a socket is read only while its stream has send credit and the tunnel is
/// writable, so memory per stream is bounded by its window and one slow reader never stops another stream.
///
/// Threading: all state lives on the tunnel channel's event loop. Public methods may be called from any
/// thread; they hop to that loop.
public final class TunnelMux: ChannelInboundHandler {
    public typealias InboundIn = Frame
    public typealias OutboundOut = Frame

    public enum Role: Sendable {
        /// Opens streams (odd ids).
        case server
        /// Accepts streams.
        case agent
    }

    public let role: Role
    public let limits: TunnelLimits
    public let counters = TunnelCounters()
    /// Held strongly until the connection closes: the delegate is typically the session object that nothing
    /// else owns. Set it before the mux is in a pipeline; from then on only the event loop touches it (a strong
    /// reference stored from two threads can be released twice), so let go of it with ``detachDelegate()``.
    public var delegate: TunnelMuxDelegate?

    /// Drops the delegate on the event loop, from any thread.
    public func detachDelegate() {
        if eventLoop.inEventLoop {
            delegate = nil
        } else {
            eventLoop.execute { self.delegate = nil }
        }
    }
    /// The tunnel channel's event loop.
    public let eventLoop: EventLoop

    var context: ChannelHandlerContext?
    /// The frame codec this mux talks to directly (see `handlerAdded`).
    var decoder: FrameDecoder?
    var encoder: FrameEncoder?
    var streams: [UInt32: Stream] = [:]
    var nextStreamID: UInt32
    /// What this connection's streams hold of the window and retention budgets, the only place that takes and
    /// gives back any of them.
    var ledger: BudgetLedger
    /// Receive window granted over this connection.
    var windowBudgetUsed: Int { ledger.windows }
    /// Streams opened by this side that the peer has not answered yet.
    var pendingOpens = 0
    /// Waiting for the last stream to end (``whenIdle()``).
    var idleWaiters: [EventLoopPromise<Void>] = []
    /// Open, draining, failed or closed (``ConnectionStateMachine``).
    var connection = ConnectionStateMachine()
    /// Streams with DATA to hand to their glue when the current read of the tunnel completes.
    var toDeliver: [Stream] = []
    /// Streams with bytes and credit, waiting for the tunnel to take DATA: served in turn, one frame each
    /// (``sendQueued()``), so a small reply is not queued behind a bulk transfer's whole read.
    var sendQueue = CircularBuffer<Stream>()
    /// Streams whose waiting bytes fit in one small frame: they go first (``nextToSend()``).
    var urgentQueue = CircularBuffer<Stream>()
    /// Turns the urgent line took in a row while the main line waited.
    var urgentInARow = 0
    /// DATA bytes written since the last flush.
    var unflushedData = 0
    /// The tunnel's link is the bottleneck and slow (``TunnelLimits/pacedBelowBytesPerSecond``): short queues, small
    /// frames. Judged from what a busy tunnel moves (``judgeRate()``).
    var paced = false {
        didSet { counters.setPaced(paced) }
    }
    /// Since when DATA bytes are counted for the next judgement, how many, and whether the tunnel was found not
    /// writable meanwhile (only then is the link the bottleneck).
    var rateWindow = (start: NIODeadline.uptimeNanoseconds(0), bytes: 0, blocked: false)
    /// The rate (bytes/s) the last judgement measured.
    var measuredRate = 0.0
    /// Bytes the tunnel's socket holds unsent (`tcpi_notsent_bytes`), nil where there is no TCP socket. Tests set it.
    var unsentBytes: (Channel) -> Int? = SocketTuning.unsentBytes
    /// The look again of a paced tunnel held back by its socket's unsent bytes (``TunnelLimits/pacedUnsentLimit``).
    var unsentRecheck: Scheduled<Void>?
    /// Socket bytes read and not yet sent, over all streams (``TunnelLimits/queuedDataLimit``).
    var queuedData = 0
    /// Frames written outside a tunnel read wait for one flush at the end of the event loop's current tick, so
    /// that many streams' bytes leave in one TLS write instead of one system call each.
    var flushScheduled = false
    var inTunnelRead = false
    /// When the last frame arrived, for keepalive; readable from any thread (an agent picks a fresh tunnel to
    /// promote from outside its loop). Written per frame: a relaxed atomic store, no lock.
    public var lastFrameReceived: NIODeadline { .uptimeNanoseconds(lastFrameNanoseconds.load(ordering: .relaxed)) }
    private let lastFrameNanoseconds = ManagedAtomic<UInt64>(NIODeadline.now().uptimeNanoseconds)
    /// Replies written since the tunnel last was writable (see ``TunnelLimits/maxUnreadReplies``).
    var unreadReplies = 0
    /// PINGs the peer may still send now (``TunnelLimits/pingBurst``, refilled at ``TunnelLimits/pingsPerSecond``),
    /// and when the bucket was last refilled; set at the first PING.
    var pingTokens = 0.0
    var pingsCountedAt: NIODeadline?
    /// The highest stream id the peer has opened (agent side): ids are never reused.
    var lastPeerStreamID: UInt32 = 0

    // Resuming (TunnelMux+Resume.swift).
    /// Streams keep what they sent until credited, and a lost connection suspends them (``enableResume(grace:)``).
    var resumable = false
    var resumeGrace: TimeAmount = .seconds(30)
    /// The connection is being closed on purpose: its streams end with it (``closeWithoutResume()``).
    var resumeRefused = false
    /// Where the tunnel is in moving its streams between connections: suspended, taking over, frozen until the
    /// peer's RESUME, handed over... with the timer, streams and resets of that phase (``ResumeMachine``).
    var resume = ResumeMachine()
    /// The mux that took this one's streams over: socket events of those streams are passed on to it.
    var successor: TunnelMux? { resume.successor }
    /// Bytes all streams keep to send again (resumable tunnels), at most ``TunnelLimits/maxRetained``.
    var retainedTotal: Int { ledger.retained }
    /// Streams that ended here while their last DATA or FIN may not have reached the peer, with what they kept
    /// (TunnelMux+Lingering.swift), and in the order they ended, each with the confirming PING it waits for.
    var lingering: [UInt32: Stream] = [:]
    var lingeringOrder = CircularBuffer<(id: UInt32, ping: UInt64)>()
    var confirmPingsSent: UInt64 = 0
    var confirmPingsAnswered: UInt64 = 0
    var lastConfirmPing = NIODeadline.uptimeNanoseconds(0)
    /// When this side last sent a PING of either kind (``keepalivePing(skipWithin:)``).
    var lastPingSent = NIODeadline.uptimeNanoseconds(0)
    var confirmTimer: Scheduled<Void>?

    public init(role: Role, eventLoop: EventLoop, limits: TunnelLimits = TunnelLimits()) {
        self.role = role
        self.eventLoop = eventLoop
        self.limits = limits
        self.ledger = BudgetLedger(limits: limits)
        self.nextStreamID = role == .server ? 1 : 2
    }

    // MARK: Channel events

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        // Behind a frame codec (the tunnel's pipeline: TLS, FrameDecoder, FrameEncoder, mux), frames pass by
        // direct calls: through the pipeline NIO boxes each `Frame` into an `NIOAny`, an allocation per frame
        // each way. Nothing that handles frames may sit between the codec and the mux.
        let sync = context.pipeline.syncOperations
        if let decoder = try? sync.handler(type: FrameDecoder.self),
            let encoder = try? sync.handler(type: FrameEncoder.self)
        {
            decoder.sink = self
            self.decoder = decoder
            self.encoder = encoder
        }
    }

    public func channelInactive(context: ChannelHandlerContext) {
        connectionEnded()
        context.fireChannelInactive()
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        connectionEnded()
        decoder?.sink = nil
        decoder = nil
        encoder = nil
        self.context = nil
    }

    public func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            unreadReplies = 0
            sendQueued()
        }
        for stream in streams.values { updateReadState(stream) }
        context.fireChannelWritabilityChanged()
    }

    public func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.fireErrorCaught(error)
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        receive(unwrapInboundIn(data))
    }

    /// One frame from the peer: from `channelRead`, or straight from the ``FrameDecoder`` before this mux.
    func receive(_ frame: Frame) {
        guard let context, connection.receivesFrames else { return }
        lastFrameNanoseconds.store(NIODeadline.now().uptimeNanoseconds, ordering: .relaxed)
        inTunnelRead = true
        do {
            try handle(frame, context: context)
        } catch {
            // A malformed or illegal frame: the peer is broken; say why and close.
            connection.fail()
            sendRefusedAndClose(reason: "\(error)")
            context.fireErrorCaught(error)
        }
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        inTunnelRead = false
        deliverQueued()
        flushTunnel()
        context.fireChannelReadComplete()
    }

    /// Hands each stream's gathered DATA to its glue.
    func deliverQueued() {
        guard !toDeliver.isEmpty else { return }
        let streams = toDeliver
        toDeliver.removeAll(keepingCapacity: true)
        for stream in streams { deliver(stream) }
    }

    func deliver(_ stream: Stream) {
        stream.deliveryQueued = false
        guard let glue = stream.glue, !stream.inbound.isEmpty else { return }
        glue.deliverFromTunnel(stream.inbound)
        // The glue keeps no reference (unless it hopped), so the storage is reused for the next read.
        stream.inbound.removeAll(keepingCapacity: true)
    }

    // MARK: Internals (on the loop)

    var allocator: ByteBufferAllocator { context?.channel.allocator ?? ByteBufferAllocator() }

    func execute(_ body: @escaping () -> Void) {
        if eventLoop.inEventLoop {
            body()
        } else {
            eventLoop.execute(body)
        }
    }

    /// `stream` leaves the map: it gives back its window (and, unless it lingers with them, the bytes it kept), and
    /// what waits in it is dropped.
    func streamRemoved(_ stream: Stream, keepRetained: Bool = false) {
        stream.inbound = []
        ledger.releaseWindow(stream)
        if !keepRetained { ledger.releaseRetained(stream) }
        if let pending = stream.pending {
            queuedData -= pending.readableBytes
            stream.pending = nil
        }
        stream.openTimer?.cancel()
        if stream.openPromise != nil { pendingOpens -= 1 }
        counters.setStreams(streams.count)
        notifyIfIdle()
    }

    /// Ends a stream this side gives up: gone from the map and the budgets, RST to the peer, its socket reset. A
    /// stream still opening answers its open with `openFailure` (a promise dropped unanswered would leave its
    /// opener waiting, and trap in a debug build).
    func reset(_ stream: Stream, openFailure: OpenFail? = nil) {
        streams.removeValue(forKey: stream.id)
        stream.lifecycle.reset()
        streamRemoved(stream)  // while `openPromise` is set: the pending open is counted off there
        sendReset(stream.id)
        stream.glue?.resetFromTunnel()
        if let promise = stream.openPromise {
            stream.openPromise = nil
            promise.succeed(
                .failed(
                    openFailure
                        ?? OpenFail(
                            code: OpenFail.callerGoneCode, reason: "the stream was cancelled while it was opening")))
        }
    }

    /// Pauses the stream's socket while it has unsent bytes, no credit, or the tunnel is not writable, and
    /// resumes it when none of that holds (GlueHandler-style backpressure).
    func updateReadState(_ stream: Stream) {
        guard let glue = stream.glue else { return }
        let pause = stream.pending != nil || stream.send.available <= 0 || tunnelFull || isFrozen(stream.id)
        guard pause != stream.readPaused else { return }
        stream.readPaused = pause
        glue.setPausedFromTunnel(pause)
    }

    /// No socket is read: the tunnel is closed, or it is not writable and ``TunnelLimits/queuedDataLimit`` bytes
    /// already wait for it.
    var tunnelFull: Bool {
        guard let context else { return true }
        return !context.channel.isWritable && queuedData >= limits.queuedDataLimit
    }

    func sendFin(_ stream: Stream) {
        guard stream.lifecycle.sendFin() else { return }
        writeStreamFrame(.fin(streamID: stream.id, allocator: allocator))
        removeIfDone(stream)
    }

    func removeIfDone(_ stream: Stream) {
        guard stream.lifecycle.isClosed else { return }
        // The glue closes its socket itself once both directions are done; it may still be flushing.
        guard streams.removeValue(forKey: stream.id) != nil else { return }
        let lingers = resumable && !resumeRefused && !stream.unresumable
        streamRemoved(stream, keepRetained: lingers)
        if lingers { linger(stream) }
    }

    func shutdownStreams() {
        guard connection.close() else { return }
        resume.end()?.cancel()
        let all = streams.values
        streams = [:]
        sendQueue.removeAll()
        urgentQueue.removeAll()
        queuedData = 0
        for stream in lingering.values { ledger.release(stream) }
        forgetLingering()
        counters.setStreams(0)
        for stream in all {
            ledger.release(stream)
            stream.openTimer?.cancel()
        }
        assert(ledger.windows == 0 && ledger.retained == 0, "a stream's budget charge was not given back")
        pendingOpens = 0
        notifyIfIdle()
        for stream in all {
            stream.glue?.resetFromTunnel()
            stream.openPromise?.succeed(.failed(OpenFail(code: 502, reason: "tunnel connection closed")))
        }
        delegate?.muxDidClose(self)
        delegate = nil
    }

    /// Tells the peer why it is cut off, then closes. Nothing more from this peer is decoded, and the close comes
    /// from under TLS: a closing TLS handler waits for the peer's close_notify while it keeps reading and
    /// decrypting, and a flooding peer, which never sends one, kept the loop decoding its frames for seconds after
    /// it was refused.
    func sendRefusedAndClose(reason: String) {
        guard let context else { return }
        decoder?.discardInput()
        let channel = context.channel
        // A peer that does not read would hold the REFUSED, and the connection, forever.
        guard channel.isWritable else {
            StreamGlue.closeFromHead(channel)
            return
        }
        let fallback = channel.eventLoop.scheduleTask(in: .seconds(1)) { StreamGlue.closeFromHead(channel) }
        context.writeAndFlush(wrapOutboundOut(Refused(reason: reason).frame(allocator: channel.allocator)))
            .whenComplete { _ in
                fallback.cancel()
                StreamGlue.closeFromHead(channel)
            }
    }
}
