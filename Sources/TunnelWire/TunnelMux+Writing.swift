import NIOCore

/// Writing frames towards the peer: a stream's frames leave with the tick's flush, connection frames at once, and
/// replies the peer asks for are rationed.
extension TunnelMux {
    func writeFrame(_ frame: Frame, flush: Bool) {
        send(frame)
        if flush { flushTunnel() }
    }

    /// Counts one PING from the peer against its rate. A keepalive needs one every few seconds; a flood of them
    /// made the tunnel's event loop decode and answer hundreds of thousands of frames a second (until the PONGs
    /// filled the socket and the unread-replies limit cut it off), while every other connection on the loop
    /// waited its turn behind those reads.
    func countPing() throws {
        let now = eventLoop.now
        let burst = Double(limits.pingBurst)
        if let last = pingsCountedAt {
            pingTokens = min(burst, pingTokens + Double((now - last).nanoseconds) / 1e9 * limits.pingsPerSecond)
        } else {
            pingTokens = burst
        }
        pingsCountedAt = now
        guard pingTokens >= 1 else {
            throw FrameError(
                "PINGs faster than \(limits.pingsPerSecond) a second (bursts of \(limits.pingBurst))",
                limit: "ping_rate")
        }
        pingTokens -= 1
    }

    /// Writes a frame the peer's frame asks for. A peer that keeps asking while it does not read what we
    /// send is cut off before its replies pile up.
    func reply(_ frame: Frame) throws {
        if let channel = context?.channel, !channel.isWritable {
            unreadReplies += 1
            guard unreadReplies <= limits.maxUnreadReplies else {
                throw FrameError("peer does not read: \(unreadReplies) replies unsent", limit: "unread_replies")
            }
        }
        send(frame)
    }

    /// The peer is registered (HELLO answered): frames up to ``Frame/maxPayload`` are accepted from now on.
    public func peerRegistered() {
        execute { self.decoder?.maxPayload = Frame.maxPayload }
    }

    /// Writes a frame towards the peer: into the encoder next to this mux directly, or through the pipeline.
    func send(_ frame: Frame) {
        if let encoder, encoder.encode(frame) { return }
        context?.write(wrapOutboundOut(frame), promise: nil)
    }

    /// A frame of one stream (OPEN, OPEN_OK, OPEN_FAIL, WINDOW, FIN, RST): it leaves with the tick's flush, so
    /// that the frames of thousands of streams opening and closing share TLS records and write calls.
    /// Connection-level frames (PING, GOAWAY, control messages) are flushed at once.
    func writeStreamFrame(_ frame: Frame) {
        writeFrame(frame, flush: false)
        scheduleFlush()
    }

    /// Flushes the tunnel once the event loop has handled everything that is ready now (all sockets' reads of
    /// this tick), or at the end of the tunnel read in progress.
    func scheduleFlush() {
        guard !inTunnelRead, !flushScheduled else { return }
        flushScheduled = true
        eventLoop.execute {
            self.flushScheduled = false
            self.flushTunnel()
        }
    }
}
