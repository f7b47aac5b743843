import NIOCore

/// What a ``StreamEndpoint`` (a ``StreamGlue``, a gRPC connectID) calls, from any thread: each hops to the tunnel's
/// event loop.
extension TunnelMux {
    /// `forwarded`: an old tunnel passed the attach on (the stream was resumed here): the glue moves here too.
    public func attach(_ glue: any StreamEndpoint, to streamID: UInt32, forwarded: Bool = false) {
        execute {
            guard let stream = self.streams[streamID] else {
                if let successor = self.successor {
                    successor.attach(glue, to: streamID, forwarded: true)
                } else {
                    glue.resetFromTunnel()
                }
                return
            }
            if forwarded { glue.moveToTunnel(self) }
            stream.glue = glue
            self.deliver(stream)
            if stream.lifecycle.state == .halfClosedRemote { glue.finishOutputFromTunnel() }  // the FIN came first
            self.updateReadState(stream)
        }
    }

    public func dataFromSocket(_ streamID: UInt32, _ buffer: ByteBuffer) {
        // Called for every socket read: on the tunnel's own loop no closure is made (`execute` would allocate one).
        guard eventLoop.inEventLoop else {
            eventLoop.execute { self.dataFromSocket(streamID, buffer) }
            return
        }
        guard let stream = streams[streamID] else {
            successor?.dataFromSocket(streamID, buffer)
            return
        }
        guard stream.lifecycle.canSend || stream.lifecycle.state == .opening, !stream.finAfterPending else { return }
        if stream.pending != nil {
            stream.pending!.writeImmutableBuffer(buffer)
        } else {
            stream.pending = buffer
            stream.pending!.makeKept()  // it may wait for credit: one byte must not pin a whole read buffer
        }
        let wasFull = tunnelFull
        queuedData += buffer.readableBytes
        flushPending(stream)
        if !wasFull && tunnelFull {
            for other in streams.values { updateReadState(other) }  // the queue is full: every socket waits
        }
    }

    public func socketInputClosed(_ streamID: UInt32) {
        execute {
            guard let stream = self.streams[streamID] else {
                self.successor?.socketInputClosed(streamID)
                return
            }
            guard stream.lifecycle.canSend || stream.lifecycle.state == .opening else { return }
            if stream.pending != nil || !stream.lifecycle.canSend || self.holdsFrames(of: stream) {
                stream.finAfterPending = true
            } else {
                self.sendFin(stream)
            }
        }
    }

    /// The socket closed. `eof`: it ended cleanly after its output was finished (NIO reports that as a close,
    /// not as an input EOF, once both halves are shut): the stream ends with FIN after its last bytes, as a
    /// half-close would. Otherwise the stream is reset.
    public func socketClosed(_ streamID: UInt32, eof: Bool = false) {
        execute {
            guard self.streams[streamID] != nil else {
                self.successor?.socketClosed(streamID, eof: eof)
                return
            }
            if eof, let stream = self.streams[streamID], stream.lifecycle.canSend {
                stream.glue = nil  // the socket is gone; what it sent still goes out
                if stream.pending != nil || self.holdsFrames(of: stream) {
                    stream.finAfterPending = true
                } else {
                    self.sendFin(stream)
                }
                return
            }
            guard let stream = self.streams[streamID] else { return }
            // Ended both ways (the socket closes as the peer's FIN reaches it): as any stream that ended.
            guard !stream.lifecycle.isClosed else { return self.removeIfDone(stream) }
            self.streams.removeValue(forKey: streamID)
            stream.lifecycle.reset()
            self.sendReset(streamID)
            self.streamRemoved(stream)
        }
    }

    /// `count` bytes of the stream left for its socket's kernel buffer. `promptly`: the socket took them in the
    /// write that delivered them — its reader keeps up, so a starved sender may be given a larger window.
    public func consumedBySocket(_ streamID: UInt32, count: Int, promptly: Bool) {
        guard eventLoop.inEventLoop else {  // as in dataFromSocket: no closure on the tunnel's loop
            eventLoop.execute { self.consumedBySocket(streamID, count: count, promptly: promptly) }
            return
        }
        guard let stream = streams[streamID] else {
            successor?.consumedBySocket(streamID, count: count, promptly: promptly)
            return
        }
        guard let update = ledger.consumed(count, by: stream, promptly: promptly) else { return }
        let consumed = update.increment - UInt32(update.growth)
        stream.credited &+= UInt64(consumed)
        guard resumable, update.growth > 0 else {
            writeStreamFrame(.window(streamID: streamID, increment: update.increment, allocator: allocator))
            return
        }
        // A resuming sender keeps its bytes until they are consumed: growth is credit, not consumption.
        if consumed > 0 { writeStreamFrame(.window(streamID: streamID, increment: consumed, allocator: allocator)) }
        var growth = Frame.window(streamID: streamID, increment: UInt32(update.growth), allocator: allocator)
        growth.flags = Frame.windowGrowth
        writeStreamFrame(growth)
    }
}

extension TunnelMux {
    /// Whether the stream still holds bytes from its caller that the peer has not been sent, or the FIN that
    /// follows them; false once it ended. On the mux's loop (the answer is sent back there).
    public func holdsUnsent(_ streamID: UInt32) -> EventLoopFuture<Bool> {
        eventLoop.submit {
            guard let stream = self.streams[streamID] else {
                return false
            }
            return stream.pending != nil || stream.finAfterPending || self.holdsFrames(of: stream)
        }
    }
}
