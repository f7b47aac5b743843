import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// Joins one socket to one tunnel stream (the GlueHandler pattern of swift-nio-ssh's examples).
///
/// The socket is read only while the ``TunnelMux`` has not paused it (it pauses when the stream runs out of
/// credit, has unsent bytes, or the tunnel is not writable);
/// bytes written to the socket are credited back to the peer once the write completed, so the peer can never
/// make this socket's outbound buffer hold more than the stream's window. Half-close travels both ways; the
/// socket is closed once both directions are finished, or at once when the stream is reset.
///
/// Completion is seen without a promise per write (a promise, its future and the callback closures were four
/// allocations per tunnel read of every stream): the socket channel's write-buffer watermarks are set to one
/// byte, so the channel is writable exactly when NIO holds nothing unsent. After a flush that left the channel
/// writable, the bytes are in the kernel and credited at once; otherwise they are credited when the channel
/// becomes writable again, having drained.
///
/// Threading: the glue lives on its socket channel's event loop; the mux calls the `…FromTunnel` methods from
/// its own loop and they hop.
public final class StreamGlue: ChannelDuplexHandler, StreamEndpoint {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    /// The tunnel this socket's events go to; it changes when the stream is resumed on a new connection
    /// (``moveToTunnel(_:)``). Read and written on the glue's loop only.
    private var mux: TunnelMux
    public let streamID: UInt32
    private let eventLoop: EventLoop
    private var context: ChannelHandlerContext?
    /// Reads are held back while paused; a `read()` that arrives meanwhile is replayed on resume.
    private(set) var paused = false
    private var readPending = false
    /// How far the socket has been closed, each direction on its own, or why it was given up.
    enum SocketState: Equatable {
        case open
        /// The socket sent EOF; the stream still writes to it.
        case inputClosed
        /// The stream finished (FIN): we shut the socket's output; it may still send.
        case outputClosed
        /// Both directions ended in order.
        case closed
        /// The stream was reset from the tunnel.
        case reset
        /// The socket failed (reset by its peer, ...): its close aborts the stream.
        case failed
    }

    private(set) var socketState = SocketState.open
    private var outputOpen: Bool { socketState == .open || socketState == .inputClosed }
    /// Bytes written to the socket that NIO still holds (the channel is not writable): credited when it drains.
    private var uncredited = 0
    /// Bytes from the tunnel that arrived while NIO still held unsent bytes: gathered here, in one buffer, and
    /// written when the socket drains (counted in ``uncredited``).
    private var held: ByteBuffer?
    /// Completes once every byte the stream brought is written and the socket's output is shut: only then may
    /// the socket be closed whole (NIO fails the writes it still holds when a socket closes).
    private var outputFinished: EventLoopFuture<Void>?

    /// Writable means "nothing unsent": not writable above one buffered byte, writable again at none.
    static let watermark = ChannelOptions.Types.WriteBufferWaterMark(low: 1, high: 1)

    /// - Parameter eventLoop: the event loop of the socket channel this glue is added to.
    public init(mux: TunnelMux, streamID: UInt32, eventLoop: EventLoop) {
        self.mux = mux
        self.streamID = streamID
        self.eventLoop = eventLoop
    }

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        // A channel that is already closed has nothing to credit; the stream is reset when the mux learns it.
        try? context.channel.syncOptions?.setOption(.writeBufferWaterMark, value: Self.watermark)
        mux.attach(self, to: streamID)
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        mux.dataFromSocket(streamID, unwrapInboundIn(data))
    }

    public func read(context: ChannelHandlerContext) {
        if paused {
            readPending = true
        } else {
            context.read()
        }
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            switch socketState {
            case .open:
                socketState = .inputClosed
            case .outputClosed:
                socketState = .closed
                closeWhenOutputFinished(context)
            default:
                break
            }
            mux.socketInputClosed(streamID)
        }
        context.fireUserInboundEventTriggered(event)
    }

    public func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable && held != nil && outputOpen {
            writeHeld(context)  // credited when this drains too (or at once, if the kernel took it all)
        }
        if context.channel.isWritable && uncredited > 0 {
            let count = uncredited
            uncredited = 0
            mux.consumedBySocket(streamID, count: count, promptly: false)
        }
        context.fireChannelWritabilityChanged()
    }

    public func channelInactive(context: ChannelHandlerContext) {
        // After we shut its output, a socket whose peer then closes is closed whole by NIO with no inputClosed
        // event: that is still an orderly end of its input, not an abort.
        mux.socketClosed(streamID, eof: socketState == .outputClosed || socketState == .closed)
        context.fireChannelInactive()
    }

    public func errorCaught(context: ChannelHandlerContext, error: Error) {
        if socketState != .reset { socketState = .failed }
        context.close(promise: nil)
    }

    // MARK: From the mux

    /// The stream was resumed on `mux`'s connection: the socket's events go straight there from now on. Until this
    /// runs, they reach the old tunnel, which passes them on; so a stream resumed many times keeps no chain of old
    /// tunnels alive, and no socket event takes more than one extra hop.
    public func moveToTunnel(_ mux: TunnelMux) {
        hop { self.mux = mux }
    }

    /// Writes the bytes a read of the tunnel brought for this stream with one flush, and credits them back to
    /// the peer once the socket took them all. While NIO still holds unsent bytes for the socket, new small pieces are
    /// gathered into one buffer instead (``held``) and written when the socket drains (or before the next large
    /// piece): a peer sending one byte per frame to a socket that does not read costs those bytes, not a buffer
    /// object and a pending write per byte.
    public func deliverFromTunnel(_ buffers: [ByteBuffer]) {
        // Called for every tunnel read that carried this stream's bytes: on the socket's own loop (the usual
        // case) no closure is made for the hop.
        guard eventLoop.inEventLoop else {
            eventLoop.execute { self.deliverFromTunnel(buffers) }
            return
        }
        guard let context, outputOpen else { return }
        var count = 0
        if uncredited > 0 || !context.channel.isWritable {
            // A piece that is large and fills most of its buffer goes to NIO as it is (no copy: a bulk transfer to
            // a socket that is full for a moment copies nothing); small pieces are gathered, in order.
            var wrote = false
            for buffer in buffers {
                count += buffer.readableBytes
                if buffer.readableBytes >= KeptBytes.smallPiece && !buffer.pinsMoreThanItCarries {
                    writeHeld(context, flush: false)
                    context.write(wrapOutboundOut(buffer), promise: nil)
                    wrote = true
                } else if held == nil {
                    held = buffer
                    held!.makeKept()
                } else {
                    held!.writeImmutableBuffer(buffer)
                }
            }
            uncredited += count  // credited once the socket took them: channelWritabilityChanged
            if wrote { context.flush() }
            return
        }
        for buffer in buffers {
            count += buffer.readableBytes
            context.write(wrapOutboundOut(buffer), promise: nil)
        }
        context.flush()
        if context.channel.isWritable {
            mux.consumedBySocket(streamID, count: count, promptly: true)
        } else {
            uncredited += count  // the kernel's buffer is full: credited by channelWritabilityChanged
        }
    }

    /// Hands the gathered bytes to the channel (before the output is shut, before a large piece, or when the socket
    /// drained).
    private func writeHeld(_ context: ChannelHandlerContext, flush: Bool = true) {
        guard let bytes = held else { return }
        held = nil
        if flush {
            context.writeAndFlush(wrapOutboundOut(bytes), promise: nil)
        } else {
            context.write(wrapOutboundOut(bytes), promise: nil)
        }
    }

    public func setPausedFromTunnel(_ paused: Bool) {
        hop {
            self.paused = paused
            guard !paused, self.readPending, let context = self.context else { return }
            self.readPending = false
            context.read()
        }
    }

    public func finishOutputFromTunnel() {
        hop {
            guard let context = self.context, self.outputOpen else { return }
            self.writeHeld(context)  // every byte the stream brought goes before the output is shut
            let promise = context.eventLoop.makePromise(of: Void.self)
            self.outputFinished = promise.futureResult
            if self.socketState == .inputClosed {
                // Both directions are done. NIO turns an output shutdown of a socket whose input is shut into a
                // whole close, which fails the writes it still holds: a slow reader would get a clean, short end.
                // An empty write completes after every earlier one; the socket closes then.
                self.socketState = .closed
                context.writeAndFlush(self.wrapOutboundOut(ByteBuffer()), promise: promise)
                self.closeWhenOutputFinished(context)
            } else {
                self.socketState = .outputClosed
                context.close(mode: .output, promise: promise)  // NIO shuts the output once the writes are done
                promise.futureResult.whenFailure { _ in
                    // Transports that cannot half-close (or already closed): finish the whole socket.
                    context.close(promise: nil)
                }
            }
        }
    }

    /// The stream was reset (its tunnel died, the peer gave it up): the socket ends with an error its peer can see.
    /// Unless every byte towards the socket had arrived (its output finished in order): then that answer is
    /// complete, and it goes out whole before an ordinary close.
    public func resetFromTunnel() {
        hop {
            guard let context = self.context, self.socketState != .reset else { return }
            let answered = self.socketState == .outputClosed || self.socketState == .closed
            self.socketState = .reset
            if answered {
                self.closeWhenOutputFinished(context)
            } else {
                Self.abort(context.channel)
            }
        }
    }

    /// Ends `channel` so that its peer sees a failure, never the clean end of a complete transfer: a TCP socket
    /// sends RST (`SO_LINGER` 0), and the close starts at the head of the pipeline, under any TLS handler, so that
    /// no close_notify is sent (TLS clients report the missing close_notify as an error). A read-until-close
    /// download cut short would otherwise look complete. A Unix socket has no RST: its peer sees EOF (and, over
    /// TLS, no close_notify). Call on the channel's event loop.
    public static func abort(_ channel: Channel) {
        _ = (channel as? SocketOptionProvider)?.setSoLinger(linger(l_onoff: 1, l_linger: 0))
        closeFromHead(channel)
    }

    /// Closes `channel` from the head of its pipeline, under any TLS handler: at once, without sending a
    /// close_notify and waiting for the peer's (which a hostile peer never sends, while it goes on writing and
    /// every byte it writes is still read and decrypted). Call on the channel's event loop.
    public static func closeFromHead(_ channel: Channel) {
        do {
            try channel.pipeline.syncOperations.addHandler(HeadClose(), position: .first)
        } catch {
            channel.close(promise: nil)
        }
    }

    private func closeWhenOutputFinished(_ context: ChannelHandlerContext) {
        guard let outputFinished else {
            context.close(promise: nil)
            return
        }
        outputFinished.whenComplete { _ in context.close(promise: nil) }
    }

    private func hop(_ body: @escaping () -> Void) {
        if eventLoop.inEventLoop {
            body()
        } else {
            eventLoop.execute(body)
        }
    }
}

/// Closes its channel as it is added, from the head of the pipeline (see ``StreamGlue/closeFromHead(_:)``).
private final class HeadClose: ChannelOutboundHandler {
    typealias OutboundIn = Never

    func handlerAdded(context: ChannelHandlerContext) {
        context.close(promise: nil)
    }
}
