import NIOCore

/// Receiving frames: what each frame type from the peer does to the streams and the tunnel.
extension TunnelMux {
    func handle(_ frame: Frame, context: ChannelHandlerContext) throws {
        guard let type = frame.type else { return }  // unknown types are ignored
        switch type {
        case .data:
            guard let stream = try stream(for: frame) else { return }
            try stream.lifecycle.receive(.data)
            let count = frame.payload.readableBytes
            try stream.receive.receive(count)
            stream.received &+= UInt64(count)
            counters.add(in: count)
            // Copied out of the tunnel's read buffer when small: it may wait for a slow socket (KeptBytes.swift).
            KeptBytes.appendKept(frame.payload, to: &stream.inbound)
            if stream.glue != nil && !stream.deliveryQueued {
                stream.deliveryQueued = true
                toDeliver.append(stream)
            }
        case .window:
            guard let increment = frame.u32Payload else { throw FrameError("WINDOW without an increment") }
            guard frame.streamID != 0, let stream = try stream(for: frame) else { return }
            try stream.lifecycle.receive(.window)
            try stream.send.grant(increment)
            if resumable {
                if frame.flags & Frame.windowGrowth == 0 {
                    // Consumed by the peer's socket: those bytes are never needed again.
                    stream.peerCredited &+= UInt64(increment)
                    ledger.releaseRetained(stream, upTo: stream.peerCredited)
                }
                // What is kept to send again is at most the peer's window, which never exceeds the maximum: a peer
                // granting more would make this side keep more.
                guard stream.send.available + stream.retainedBytes <= limits.maximumWindow else {
                    throw FrameError(
                        "WINDOW beyond the largest window of \(limits.maximumWindow) bytes", limit: "window")
                }
            }
            flushPending(stream)
        case .fin:
            guard let stream = try stream(for: frame) else { return }
            try stream.lifecycle.receive(.fin)
            if let glue = stream.glue {
                deliver(stream)  // bytes before the FIN go first
                glue.finishOutputFromTunnel()
            }  // else passed on when the glue is attached: the lifecycle remembers the FIN
            removeIfDone(stream)
        case .rst:
            guard let stream = try stream(for: frame) else {
                if !lingering.isEmpty { forgetLingering(frame.streamID) }  // the peer waits for nothing more
                return
            }
            try stream.lifecycle.receive(.rst)
            streams.removeValue(forKey: stream.id)
            streamRemoved(stream)
            stream.glue?.resetFromTunnel()
            stream.openPromise?.succeed(.failed(OpenFail(code: 502, reason: "stream reset by peer")))
        case .ping:
            guard frame.payload.readableBytes == 8 else {
                throw FrameError("PING with \(frame.payload.readableBytes) payload bytes (8 expected)")
            }
            try countPing()
            try reply(Frame(type: .pong, streamID: 0, payload: frame.payload))
        case .pong:
            confirmed(frame)
        case .openOK:
            guard role == .server else { throw FrameError("OPEN_OK from the server") }
            guard let stream = try stream(for: frame) else { return }
            try stream.lifecycle.receive(.openOK)
            let ok = try OpenOK(frame: frame)
            try checkGrantedWindow(ok.window, streamID: stream.id)
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
            try checkGrantedWindow(open.window, streamID: frame.streamID)
            // Ids only grow: an id at or below the last one opened is a stream that exists or existed.
            guard frame.streamID % 2 == 1, frame.streamID > lastPeerStreamID else {
                throw FrameError("OPEN on invalid or reused stream \(frame.streamID)")
            }
            lastPeerStreamID = frame.streamID
            guard connection.opensStreams, streams.count < limits.maxStreams else {
                try reply(
                    OpenFail(code: 503, reason: "agent is draining or at its stream limit")
                        .frame(streamID: frame.streamID, allocator: context.channel.allocator))
                return
            }
            guard let window = ledger.openWindow() else {
                try reply(
                    OpenFail(code: 503, reason: "agent is out of buffer budget", limit: "buffer_budget")
                        .frame(streamID: frame.streamID, allocator: context.channel.allocator))
                return
            }
            let stream = Stream(id: frame.streamID, openedBy: .remote, sendWindow: open.window, receive: window)
            streams[stream.id] = stream
            counters.setStreams(streams.count)
            delegate?.mux(self, didReceiveOpen: open, streamID: frame.streamID)
        case .resume:
            try receiveResume(frame)
        default:
            delegate?.mux(self, didReceiveControl: frame)
        }
    }

    /// A stream's first window from the peer (OPEN, OPEN_OK): more than ``TunnelLimits/maximumWindow`` is a protocol
    /// error, as for WINDOW, since a resumable tunnel keeps up to the peer's window to send again.
    func checkGrantedWindow(_ window: Int, streamID: UInt32) throws {
        guard window <= limits.maximumWindow else {
            throw FrameError(
                "window of \(window) bytes on stream \(streamID) beyond the largest of \(limits.maximumWindow)",
                limit: "window")
        }
    }

    /// The stream a frame from the peer is for. Nil for a stream that existed and is gone (frames that cross
    /// a reset or a close are dropped); a protocol error for an id that was never opened.
    func stream(for frame: Frame) throws -> Stream? {
        if let stream = streams[frame.streamID] {
            guard !isFrozen(stream.id) else {
                throw FrameError("\(frame.type.map { "\($0)" } ?? "frame") on stream \(stream.id) before RESUME")
            }
            return stream
        }
        let opened =
            frame.streamID % 2 == 1
            && (role == .server ? frame.streamID < nextStreamID : frame.streamID <= lastPeerStreamID)
        guard opened else {
            throw FrameError(
                "\(frame.type.map { "\($0)" } ?? "frame") on stream \(frame.streamID), which was never opened")
        }
        return nil
    }
}
