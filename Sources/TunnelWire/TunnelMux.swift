import NIOConcurrencyHelpers
import NIOCore

/// Receives what a ``TunnelMux`` cannot handle itself. Called on the tunnel channel's event loop.
public protocol TunnelMuxDelegate: AnyObject {
    /// The peer asks for a new stream (agents receive these). Answer with ``TunnelMux/acceptStream(_:)`` once
    /// a glue is attached, or ``TunnelMux/rejectStream(_:code:reason:)``.
    func mux(_ mux: TunnelMux, didReceiveOpen open: Open, streamID: UInt32)
    /// A control frame on stream 0 other than PING/PONG/WINDOW (HELLO, REFUSED, GOAWAY, JOIN, RENEW, ...).
    func mux(_ mux: TunnelMux, didReceiveControl frame: Frame)
    /// The tunnel connection is gone; every stream has been reset.
    func muxDidClose(_ mux: TunnelMux)
}

/// Limits of one tunnel connection.
public struct TunnelLimits: Sendable {
    /// Initial receive window of a stream.
    public var initialWindow = 1 << 20
    /// A stream's receive window grows up to this while its sender keeps it full and its reader keeps up.
    public var maximumWindow = 16 << 20
    /// Sum of all stream receive windows of the connection: bounds the memory a peer can make us hold.
    public var connectionWindowBudget = 256 << 20
    /// Streams open at once on one connection (for the server: streams per agent).
    public var maxStreams = 65_536
    /// Streams of one connection waiting for the agent's OPEN_OK or OPEN_FAIL (server side).
    public var maxPendingOpens = 1024
    /// How long the server waits for the agent's answer to an OPEN; then the stream is reset and fails (504).
    public var openTimeout: TimeAmount = .seconds(15)
    /// Receive windows granted over every connection of the process; `nil`: only the per-connection budget.
    public var processBudget: WindowBudget?
    /// The smallest window a stream starts with once the budgets are used up by larger ones (and the least a
    /// stream needs from the process budget to open at all).
    public var minimumWindow = 16 * 1024
    /// The highest stream id the server opens; ids are never reused, so a connection that reaches it asks its
    /// agent to reconnect (GOAWAY) and the next streams go over the new connection.
    public var lastStreamID: UInt32 = UInt32.max - 1
    /// Replies the peer made us owe (PONG, OPEN_FAIL, RST) while it did not read what we already sent: past this
    /// the connection is closed, so a peer that sends PINGs and never reads cannot grow our write buffer
    /// (HTTP/2 stacks bound their outbound control frames the same way).
    public var maxUnreadReplies = 1024

    public init() {}
}

/// Outcome of opening a stream from this side.
public enum OpenResult: Sendable {
    case opened(streamID: UInt32)
    case failed(OpenFail)
}

/// Byte counters of one tunnel connection, readable from any thread.
public final class TunnelCounters: @unchecked Sendable {
    private let lock = NIOLock()
    private var _bytesIn = 0
    private var _bytesOut = 0
    private var _streams = 0
    public init() {}
    func add(in count: Int) { lock.withLock { _bytesIn += count } }
    func add(out count: Int) { lock.withLock { _bytesOut += count } }
    func setStreams(_ count: Int) { lock.withLock { _streams = count } }
    /// (bytes received from the peer, bytes sent to it, open streams).
    public var snapshot: (bytesIn: Int, bytesOut: Int, streams: Int) {
        lock.withLock { (_bytesIn, _bytesOut, _streams) }
    }
}

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

    final class Stream {
        let id: UInt32
        var glue: StreamGlue?
        var send: SendWindow
        var receive: ReceiveWindow
        /// Socket bytes beyond the send window, waiting for credit (at most one read's worth).
        var pending: ByteBuffer?
        var finAfterPending = false
        /// DATA received and not yet handed to the glue: gathered during one read of the tunnel and handed over
        /// in one go at its end (one hop, one flush), or held until the glue is attached.
        var inbound: [ByteBuffer] = []
        /// Listed in `toDeliver` for the end of the current read.
        var deliveryQueued = false
        /// The peer's FIN came before the glue was attached: passed on when it is.
        var earlyFin = false
        /// What the glue was last told: reading from its socket is paused.
        var readPaused = false
        /// Where the stream is in its life; every frame from the peer is checked against it.
        var lifecycle: StreamStateMachine
        /// Server side, while `lifecycle` is opening: who learns the agent's answer, and the timer that gives
        /// up on it (cancelled with the answer, so ten thousand open streams leave no timers behind).
        var openPromise: EventLoopPromise<OpenResult>?
        var openTimer: Scheduled<Void>?

        init(id: UInt32, openedBy opener: StreamStateMachine.Opener, sendWindow: Int, receive: ReceiveWindow) {
            self.id = id
            self.lifecycle = StreamStateMachine(openedBy: opener)
            self.send = SendWindow(initial: sendWindow)
            self.receive = receive
        }
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

    private var context: ChannelHandlerContext?
    /// The frame codec this mux talks to directly (see `handlerAdded`).
    private var decoder: FrameDecoder?
    private var encoder: FrameEncoder?
    private var streams: [UInt32: Stream] = [:]
    private var nextStreamID: UInt32
    private var windowBudgetUsed = 0
    /// Streams opened by this side that the peer has not answered yet.
    private var pendingOpens = 0
    /// Waiting for the last stream to end (``whenIdle()``).
    private var idleWaiters: [EventLoopPromise<Void>] = []
    private var closed = false
    private var draining = false
    /// Streams with DATA to hand to their glue when the current read of the tunnel completes.
    private var toDeliver: [Stream] = []
    /// Frames written outside a tunnel read wait for one flush at the end of the event loop's current tick, so
    /// that many streams' bytes leave in one TLS write instead of one system call each.
    private var flushScheduled = false
    private var inTunnelRead = false
    /// When the last frame arrived, for keepalive.
    public private(set) var lastFrameReceived = NIODeadline.now()
    /// Replies written since the tunnel last was writable (see ``TunnelLimits/maxUnreadReplies``).
    private var unreadReplies = 0
    /// The highest stream id the peer has opened (agent side): ids are never reused.
    private var lastPeerStreamID: UInt32 = 0
    /// The peer broke the protocol: its further frames are ignored while the connection closes.
    private var failed = false

    public init(role: Role, eventLoop: EventLoop, limits: TunnelLimits = TunnelLimits()) {
        self.role = role
        self.eventLoop = eventLoop
        self.limits = limits
        self.nextStreamID = role == .server ? 1 : 2
    }

    // MARK: Channel events

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        // Behind a frame codec (the tunnel's pipeline: TLS, FrameDecoder, FrameEncoder, mux), frames pass by
        // direct calls: through the pipeline NIO boxes each `Frame` into an `NIOAny`, an allocation per frame
        // each way. Nothing that handles frames may sit between the codec and the mux.
        let sync = context.pipeline.syncOperations
        if let decoder = try? sync.handler(type: FrameDecoder.self), let encoder = try? sync.handler(type: FrameEncoder.self) {
            decoder.sink = self
            self.decoder = decoder
            self.encoder = encoder
        }
    }

    public func channelInactive(context: ChannelHandlerContext) {
        shutdownStreams()
        context.fireChannelInactive()
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        shutdownStreams()
        decoder?.sink = nil
        decoder = nil
        encoder = nil
        self.context = nil
    }

    public func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { unreadReplies = 0 }
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
        guard let context, !failed, !closed else { return }
        lastFrameReceived = .now()
        inTunnelRead = true
        do {
            try handle(frame, context: context)
        } catch {
            // A malformed or illegal frame: the peer is broken; say why and close.
            failed = true
            sendRefusedAndClose(reason: "\(error)")
            context.fireErrorCaught(error)
        }
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        inTunnelRead = false
        deliverQueued()
        context.flush()
        context.fireChannelReadComplete()
    }

    /// Hands each stream's gathered DATA to its glue.
    private func deliverQueued() {
        guard !toDeliver.isEmpty else { return }
        let streams = toDeliver
        toDeliver.removeAll(keepingCapacity: true)
        for stream in streams { deliver(stream) }
    }

    private func deliver(_ stream: Stream) {
        stream.deliveryQueued = false
        guard let glue = stream.glue, !stream.inbound.isEmpty else { return }
        glue.deliverFromTunnel(stream.inbound)
        // The glue keeps no reference (unless it hopped), so the storage is reused for the next read.
        stream.inbound.removeAll(keepingCapacity: true)
    }

    private func handle(_ frame: Frame, context: ChannelHandlerContext) throws {
        guard let type = frame.type else { return }  // unknown types are ignored
        switch type {
        case .data:
            guard let stream = try stream(for: frame) else { return }
            try stream.lifecycle.receive(.data)
            let count = frame.payload.readableBytes
            try stream.receive.receive(count)
            counters.add(in: count)
            stream.inbound.append(frame.payload)
            if stream.glue != nil && !stream.deliveryQueued {
                stream.deliveryQueued = true
                toDeliver.append(stream)
            }
        case .window:
            guard let increment = frame.u32Payload else { throw FrameError("WINDOW without an increment") }
            guard frame.streamID != 0, let stream = try stream(for: frame) else { return }
            try stream.lifecycle.receive(.window)
            try stream.send.grant(increment)
            flushPending(stream)
        case .fin:
            guard let stream = try stream(for: frame) else { return }
            try stream.lifecycle.receive(.fin)
            if let glue = stream.glue {
                deliver(stream)  // bytes before the FIN go first
                glue.finishOutputFromTunnel()
            } else {
                stream.earlyFin = true
            }
            removeIfDone(stream)
        case .rst:
            guard let stream = try stream(for: frame) else { return }
            try stream.lifecycle.receive(.rst)
            streams.removeValue(forKey: stream.id)
            streamRemoved(stream)
            stream.glue?.resetFromTunnel()
            stream.openPromise?.succeed(.failed(OpenFail(code: 502, reason: "stream reset by peer")))
        case .ping:
            guard frame.payload.readableBytes == 8 else {
                throw FrameError("PING with \(frame.payload.readableBytes) payload bytes (8 expected)")
            }
            try reply(Frame(type: .pong, streamID: 0, payload: frame.payload))
        case .pong:
            break
        case .openOK:
            guard role == .server else { throw FrameError("OPEN_OK from the server") }
            guard let stream = try stream(for: frame) else { return }
            try stream.lifecycle.receive(.openOK)
            let ok = try OpenOK(frame: frame)
            try stream.send.grant(UInt32(clamping: max(0, ok.window)))
            let promise = stream.openPromise
            stream.openPromise = nil
            stream.openTimer?.cancel()
            stream.openTimer = nil
            pendingOpens -= 1
            promise?.succeed(.opened(streamID: stream.id))
        case .openFail:
            guard role == .server else { throw FrameError("OPEN_FAIL from the server") }
            guard let stream = try stream(for: frame) else { return }
            try stream.lifecycle.receive(.openFail)
            let fail = try OpenFail(frame: frame)
            streams.removeValue(forKey: stream.id)
            streamRemoved(stream)
            stream.openPromise?.succeed(.failed(fail))
            stream.openPromise = nil
        case .open:
            guard role == .agent else { throw FrameError("OPEN from an agent") }
            let open = try Open(frame: frame)
            // Ids only grow: an id at or below the last one opened is a stream that exists or existed.
            guard frame.streamID % 2 == 1, frame.streamID > lastPeerStreamID else {
                throw FrameError("OPEN on invalid or reused stream \(frame.streamID)")
            }
            lastPeerStreamID = frame.streamID
            guard !draining, streams.count < limits.maxStreams else {
                try reply(
                    OpenFail(code: 503, reason: "agent is draining or at its stream limit")
                        .frame(streamID: frame.streamID, allocator: context.channel.allocator))
                return
            }
            guard let window = newReceiveWindow() else {
                try reply(
                    OpenFail(code: 503, reason: "agent is out of buffer budget", limit: "buffer_budget")
                        .frame(streamID: frame.streamID, allocator: context.channel.allocator))
                return
            }
            let stream = Stream(id: frame.streamID, openedBy: .remote, sendWindow: open.window, receive: window)
            streams[stream.id] = stream
            counters.setStreams(streams.count)
            delegate?.mux(self, didReceiveOpen: open, streamID: frame.streamID)
        default:
            delegate?.mux(self, didReceiveControl: frame)
        }
    }

    /// The stream a frame from the peer is for. Nil for a stream that existed and is gone (frames that cross
    /// a reset or a close are dropped); a protocol error for an id that was never opened.
    private func stream(for frame: Frame) throws -> Stream? {
        if let stream = streams[frame.streamID] { return stream }
        let opened = frame.streamID % 2 == 1
            && (role == .server ? frame.streamID < nextStreamID : frame.streamID <= lastPeerStreamID)
        guard opened else {
            throw FrameError("\(frame.type.map { "\($0)" } ?? "frame") on stream \(frame.streamID), which was never opened")
        }
        return nil
    }

    // MARK: Opening streams

    /// Opens a stream to `target` (server side). The future completes once the peer answered OPEN_OK or
    /// OPEN_FAIL; after `.opened`, attach a ``StreamGlue`` for the stream id.
    public func openStream(target: String) -> EventLoopFuture<OpenResult> {
        let promise = eventLoop.makePromise(of: OpenResult.self)
        execute {
            guard let context = self.context, !self.closed else {
                promise.succeed(.failed(OpenFail(code: 502, reason: "tunnel connection is closed")))
                return
            }
            guard !self.draining else {
                promise.succeed(.failed(OpenFail(code: 503, reason: "tunnel connection is draining")))
                return
            }
            guard self.nextStreamID <= self.limits.lastStreamID, self.nextStreamID <= UInt32.max - 2 else {
                // Every id is used: the agent reconnects on GOAWAY, and its new connection takes the next streams.
                self.draining = true
                self.writeFrame(GoAway(reason: "stream ids exhausted: reconnect").frame(allocator: self.allocator), flush: true)
                promise.succeed(.failed(OpenFail(code: 503, reason: "stream ids of the tunnel exhausted: the agent is reconnecting")))
                return
            }
            guard self.streams.count < self.limits.maxStreams else {
                promise.succeed(.failed(OpenFail(
                    code: 503, reason: "the agent has \(self.streams.count) streams open, its limit", limit: "streams_per_agent")))
                return
            }
            guard self.pendingOpens < self.limits.maxPendingOpens else {
                promise.succeed(.failed(OpenFail(
                    code: 503, reason: "\(self.pendingOpens) streams to the agent are still opening, its limit",
                    limit: "pending_opens")))
                return
            }
            guard let window = self.newReceiveWindow() else {
                promise.succeed(.failed(OpenFail(
                    code: 503, reason: "the server's stream buffer budget is exhausted", limit: "buffer_budget")))
                return
            }
            let id = self.nextStreamID
            self.nextStreamID += 2
            let stream = Stream(id: id, openedBy: .local, sendWindow: 0, receive: window)
            stream.openPromise = promise
            self.pendingOpens += 1
            self.streams[id] = stream
            self.counters.setStreams(self.streams.count)
            // An agent that never answers must not hold the stream (and its caller) forever.
            stream.openTimer = self.eventLoop.scheduleTask(in: self.limits.openTimeout) { [weak self] in
                guard let self, let stream = self.streams[id], let pending = stream.openPromise else { return }
                self.streams.removeValue(forKey: id)
                self.streamRemoved(stream)
                stream.openPromise = nil
                self.writeStreamFrame(.rst(streamID: id, code: .cancel, allocator: self.allocator))
                pending.succeed(.failed(OpenFail(code: 504, reason: "the agent did not reach \(target) in time")))
            }
            self.writeStreamFrame(
                Open(target: target, window: stream.receive.size).frame(streamID: id, allocator: context.channel.allocator))
        }
        return promise.futureResult
    }

    /// Cancels a stream that is still opening or open (the caller went away).
    public func cancelStream(_ streamID: UInt32) {
        execute {
            guard let stream = self.streams.removeValue(forKey: streamID) else { return }
            stream.lifecycle.reset()
            self.streamRemoved(stream)
            self.writeStreamFrame(.rst(streamID: streamID, code: .cancel, allocator: self.allocator))
            stream.glue?.resetFromTunnel()
        }
    }

    /// Agent side: the target is dialled and `glue` attached; tell the server.
    public func acceptStream(_ streamID: UInt32) {
        execute {
            guard let stream = self.streams[streamID], let context = self.context, stream.lifecycle.sendOpenOK() else {
                return
            }
            self.writeStreamFrame(
                OpenOK(window: stream.receive.size).frame(streamID: streamID, allocator: context.channel.allocator))
            self.flushPending(stream)  // what the target sent before the answer went out
        }
    }

    /// Agent side: the stream cannot be opened.
    public func rejectStream(_ streamID: UInt32, code: Int, reason: String) {
        execute {
            guard let stream = self.streams.removeValue(forKey: streamID), let context = self.context else { return }
            self.streamRemoved(stream)
            self.writeStreamFrame(
                OpenFail(code: code, reason: reason).frame(streamID: streamID, allocator: context.channel.allocator))
        }
    }

    /// Sends a control message on stream 0.
    public func sendControl<M: ControlMessage>(_ message: M) {
        execute {
            self.writeFrame(message.frame(allocator: self.allocator), flush: true)
        }
    }

    /// Sends a PING.
    public func ping() {
        execute {
            self.writeFrame(.ping(.ping, opaque: UInt64(NIODeadline.now().uptimeNanoseconds), allocator: self.allocator), flush: true)
        }
    }

    /// No new streams; open ones finish. Sends GOAWAY to the peer.
    public func drain(reason: String) {
        execute {
            self.draining = true
            self.writeFrame(GoAway(reason: reason).frame(allocator: self.allocator), flush: true)
        }
    }

    /// Marks this side as draining without telling the peer (it told us).
    public func markDraining() {
        execute { self.draining = true }
    }

    /// Number of open streams (on the loop).
    public var streamCount: Int { streams.count }

    /// Completes when no stream is open on this connection — at once if none is — or the connection closed:
    /// a drain waits for this event instead of polling the stream count.
    public func whenIdle() -> EventLoopFuture<Void> {
        let promise = eventLoop.makePromise(of: Void.self)
        execute {
            if self.streams.isEmpty || self.closed {
                promise.succeed(())
            } else {
                self.idleWaiters.append(promise)
            }
        }
        return promise.futureResult
    }

    private func notifyIfIdle() {
        guard streams.isEmpty, !idleWaiters.isEmpty else { return }
        let waiters = idleWaiters
        idleWaiters = []
        for waiter in waiters { waiter.succeed(()) }
    }

    // MARK: Called by StreamGlue (any thread)

    func attach(_ glue: StreamGlue, to streamID: UInt32) {
        execute {
            guard let stream = self.streams[streamID] else {
                glue.resetFromTunnel()
                return
            }
            stream.glue = glue
            self.deliver(stream)
            if stream.earlyFin { glue.finishOutputFromTunnel() }
            self.updateReadState(stream)
        }
    }

    func dataFromSocket(_ streamID: UInt32, _ buffer: ByteBuffer) {
        // Called for every socket read: on the tunnel's own loop no closure is made (`execute` would allocate one).
        guard eventLoop.inEventLoop else {
            eventLoop.execute { self.dataFromSocket(streamID, buffer) }
            return
        }
        guard let stream = streams[streamID], stream.lifecycle.canSend || stream.lifecycle.state == .opening,
            !stream.finAfterPending
        else { return }
        if stream.pending != nil {
            stream.pending!.writeImmutableBuffer(buffer)
        } else {
            stream.pending = buffer
        }
        flushPending(stream)
    }

    func socketInputClosed(_ streamID: UInt32) {
        execute {
            guard let stream = self.streams[streamID], stream.lifecycle.canSend || stream.lifecycle.state == .opening
            else { return }
            if stream.pending != nil || !stream.lifecycle.canSend {
                stream.finAfterPending = true
            } else {
                self.sendFin(stream)
            }
        }
    }

    /// The socket closed. `eof`: it ended cleanly after its output was finished (NIO reports that as a close,
    /// not as an input EOF, once both halves are shut): the stream ends with FIN after its last bytes, as a
    /// half-close would. Otherwise the stream is reset.
    func socketClosed(_ streamID: UInt32, eof: Bool = false) {
        execute {
            if eof, let stream = self.streams[streamID], stream.lifecycle.canSend {
                stream.glue = nil  // the socket is gone; what it sent still goes out
                if stream.pending != nil {
                    stream.finAfterPending = true
                } else {
                    self.sendFin(stream)
                }
                return
            }
            guard let stream = self.streams.removeValue(forKey: streamID) else { return }
            if !stream.lifecycle.isClosed {
                stream.lifecycle.reset()
                self.writeStreamFrame(.rst(streamID: streamID, code: .cancel, allocator: self.allocator))
            }
            self.streamRemoved(stream)
        }
    }

    /// `count` bytes of the stream left for its socket's kernel buffer. `promptly`: the socket took them in the
    /// write that delivered them — its reader keeps up, so a starved sender may be given a larger window.
    func consumedBySocket(_ streamID: UInt32, count: Int, promptly: Bool) {
        guard eventLoop.inEventLoop else {  // as in dataFromSocket: no closure on the tunnel's loop
            eventLoop.execute { self.consumedBySocket(streamID, count: count, promptly: promptly) }
            return
        }
        guard let stream = streams[streamID] else { return }
        var mayGrow = promptly && windowBudgetUsed + stream.receive.size <= limits.connectionWindowBudget
            && stream.receive.size < stream.receive.maximum
        // Growth is at most the current size: reserved from the process budget first, the unused part returned.
        var reserved = 0
        if mayGrow, let budget = limits.processBudget {
            reserved = budget.takeGrowth(stream.receive.size) ? stream.receive.size : 0
            mayGrow = reserved > 0
        }
        let update = stream.receive.consumed(count, mayGrow: mayGrow)
        if reserved > 0 { limits.processBudget?.giveGrowth(reserved - (update?.growth ?? 0)) }
        guard let update else { return }
        windowBudgetUsed += update.growth
        writeStreamFrame(.window(streamID: streamID, increment: update.increment, allocator: allocator))
    }

    // MARK: Internals (on the loop)

    private var allocator: ByteBufferAllocator { context?.channel.allocator ?? ByteBufferAllocator() }

    private func execute(_ body: @escaping () -> Void) {
        if eventLoop.inEventLoop {
            body()
        } else {
            eventLoop.execute(body)
        }
    }

    /// A new stream's window from the connection's budget and the process's; nil when the process budget cannot
    /// spare even the minimum.
    private func newReceiveWindow() -> ReceiveWindow? {
        let remaining = limits.connectionWindowBudget - windowBudgetUsed
        var initial = max(limits.minimumWindow, min(limits.initialWindow, remaining))
        if let budget = limits.processBudget {
            guard let granted = budget.takeWindow(initial, minimum: limits.minimumWindow) else { return nil }
            initial = granted
        }
        windowBudgetUsed += initial
        return ReceiveWindow(initial: initial, maximum: limits.maximumWindow)
    }

    private func streamRemoved(_ stream: Stream) {
        stream.inbound = []
        windowBudgetUsed -= stream.receive.size
        limits.processBudget?.release(window: stream.receive.size, minimum: limits.minimumWindow)
        stream.openTimer?.cancel()
        if stream.openPromise != nil { pendingOpens -= 1 }
        counters.setStreams(streams.count)
        notifyIfIdle()
    }

    private func writeFrame(_ frame: Frame, flush: Bool) {
        send(frame)
        if flush { context?.flush() }
    }

    /// Writes a frame the peer's frame asks for. A peer that keeps asking while it does not read what we
    /// send is cut off before its replies pile up.
    private func reply(_ frame: Frame) throws {
        if let channel = context?.channel, !channel.isWritable {
            unreadReplies += 1
            guard unreadReplies <= limits.maxUnreadReplies else {
                throw FrameError("peer does not read: \(unreadReplies) replies unsent")
            }
        }
        send(frame)
    }

    /// The peer is registered (HELLO answered): frames up to ``Frame/maxPayload`` are accepted from now on.
    public func peerRegistered() {
        execute { self.decoder?.maxPayload = Frame.maxPayload }
    }

    /// Writes a frame towards the peer: into the encoder next to this mux directly, or through the pipeline.
    private func send(_ frame: Frame) {
        if let encoder, encoder.encode(frame) { return }
        context?.write(wrapOutboundOut(frame), promise: nil)
    }

    /// Sends as much of the pending socket data as the window allows, in frames of at most `Frame.maxPayload`,
    /// and the FIN that waited behind it. Nothing while the stream cannot send yet (the agent has not answered
    /// OPEN_OK): the socket's bytes wait, and its reading is paused.
    private func flushPending(_ stream: Stream) {
        defer { updateReadState(stream) }
        guard context != nil, stream.lifecycle.canSend else { return }
        var wrote = false
        if var pending = stream.pending {
            while pending.readableBytes > 0 && stream.send.available > 0 {
                let count = min(pending.readableBytes, stream.send.available, Frame.maxPayload)
                let slice = pending.readSlice(length: count)!
                stream.send.consume(count)
                counters.add(out: count)
                send(Frame(type: .data, streamID: stream.id, payload: slice))
                wrote = true
            }
            stream.pending = pending.readableBytes > 0 ? pending : nil
        }
        if stream.pending == nil && stream.finAfterPending {
            sendFin(stream)
        } else if wrote {
            scheduleFlush()
        }
    }

    /// A frame of one stream (OPEN, OPEN_OK, OPEN_FAIL, WINDOW, FIN, RST): it leaves with the tick's flush, so
    /// that the frames of thousands of streams opening and closing share TLS records and write calls.
    /// Connection-level frames (PING, GOAWAY, control messages) are flushed at once.
    private func writeStreamFrame(_ frame: Frame) {
        writeFrame(frame, flush: false)
        scheduleFlush()
    }

    /// Flushes the tunnel once the event loop has handled everything that is ready now (all sockets' reads of
    /// this tick), or at the end of the tunnel read in progress.
    private func scheduleFlush() {
        guard !inTunnelRead, !flushScheduled else { return }
        flushScheduled = true
        eventLoop.execute {
            self.flushScheduled = false
            self.context?.flush()
        }
    }

    /// Pauses the stream's socket while it has unsent bytes, no credit, or the tunnel is not writable, and
    /// resumes it when none of that holds (GlueHandler-style backpressure).
    private func updateReadState(_ stream: Stream) {
        guard let glue = stream.glue else { return }
        let writable = context?.channel.isWritable ?? false
        let pause = stream.pending != nil || stream.send.available <= 0 || !writable
        guard pause != stream.readPaused else { return }
        stream.readPaused = pause
        glue.setPausedFromTunnel(pause)
    }

    private func sendFin(_ stream: Stream) {
        guard stream.lifecycle.sendFin() else { return }
        writeStreamFrame(.fin(streamID: stream.id, allocator: allocator))
        removeIfDone(stream)
    }

    private func removeIfDone(_ stream: Stream) {
        guard stream.lifecycle.isClosed else { return }
        // The glue closes its socket itself once both directions are done; it may still be flushing.
        if streams.removeValue(forKey: stream.id) != nil { streamRemoved(stream) }
    }

    private func shutdownStreams() {
        guard !closed else { return }
        closed = true
        let all = streams.values
        streams = [:]
        counters.setStreams(0)
        for stream in all {
            limits.processBudget?.release(window: stream.receive.size, minimum: limits.minimumWindow)
            stream.openTimer?.cancel()
        }
        windowBudgetUsed = 0
        pendingOpens = 0
        notifyIfIdle()
        for stream in all {
            stream.glue?.resetFromTunnel()
            stream.openPromise?.succeed(.failed(OpenFail(code: 502, reason: "tunnel connection closed")))
        }
        delegate?.muxDidClose(self)
        delegate = nil
    }

    private func sendRefusedAndClose(reason: String) {
        guard let context else { return }
        // A peer that does not read would hold the REFUSED, and the connection, forever.
        guard context.channel.isWritable else {
            context.close(promise: nil)
            return
        }
        context.writeAndFlush(wrapOutboundOut(Refused(reason: reason).frame(allocator: context.channel.allocator)))
            .whenComplete { _ in context.close(promise: nil) }
    }
}

extension EventLoopFuture where Value == Void {
    /// Waits for this future, or for `timeout` if that passes first (a drain that must end).
    public func orTimeout(_ timeout: TimeAmount) async {
        let done = eventLoop.makePromise(of: Void.self)
        let timer = eventLoop.scheduleTask(in: timeout) { done.succeed(()) }
        whenComplete { _ in
            timer.cancel()
            done.succeed(())
        }
        try? await done.futureResult.get()
    }
}
