import NIOCore

/// Sending DATA: streams take turns on the tunnel, and a tunnel whose link is slow is paced.
extension TunnelMux {
    /// Puts a stream with pending socket bytes and credit in line for the tunnel, and sends the FIN that waited
    /// behind bytes already sent. Nothing while the stream cannot send yet (the agent has not answered OPEN_OK):
    /// the socket's bytes wait, and its reading is paused.
    func flushPending(_ stream: Stream) {
        defer { updateReadState(stream) }
        guard context != nil, stream.lifecycle.canSend else { return }
        if let pending = stream.pending {
            guard stream.send.available > 0, !stream.queuedToSend else { return }
            stream.queuedToSend = true
            // A small piece (a keystroke's echo, a short answer) goes ahead of the streams in line: it fits in one
            // frame, and its socket is not read again until it is sent, so it cannot keep a bulk stream waiting.
            if pending.readableBytes <= limits.pacedSharedFrameSize {
                sendQueue.prepend(stream)
            } else {
                sendQueue.append(stream)
            }
            sendQueued()
        } else if stream.finAfterPending {
            sendFin(stream)
        }
    }

    /// Writes DATA while the tunnel takes more (writable, and less than a flush batch since the last flush): one
    /// frame from the first stream in line, which goes to the back of the line if it has more. A paced tunnel
    /// writes frames of at most ``TunnelLimits/pacedFrameSize`` (``TunnelLimits/pacedSharedFrameSize`` while others
    /// wait) and flushes every ``TunnelLimits/pacedFlushBatch``; a fast one frames of up to ``Frame/maxPayload``
    /// and batches of 256 KiB. Control frames never wait here: they are written at once, behind at most what
    /// this lets queue.
    func sendQueued() {
        guard let context else { return }
        var wrote = false
        let flushBatch = paced ? limits.pacedFlushBatch : 256 * 1024
        while unflushedData < flushBatch, context.channel.isWritable, let stream = sendQueue.popFirst() {
            stream.queuedToSend = false
            guard streams[stream.id] === stream, stream.lifecycle.canSend, var pending = stream.pending,
                stream.send.available > 0
            else { continue }
            let frameSize = !paced ? Frame.maxPayload : sendQueue.isEmpty ? limits.pacedFrameSize : limits.pacedSharedFrameSize
            let count = min(pending.readableBytes, stream.send.available, frameSize)
            let slice = pending.readSlice(length: count)!
            stream.send.consume(count)
            counters.add(out: count)
            unflushedData += count
            rateWindow.bytes += count
            queuedData -= count
            send(Frame(type: .data, streamID: stream.id, payload: slice))
            wrote = true
            if pending.readableBytes > 0 {
                stream.pending = pending
                if stream.send.available > 0 {
                    stream.queuedToSend = true
                    sendQueue.append(stream)
                }
            } else {
                stream.pending = nil
                if stream.finAfterPending { sendFin(stream) }
                updateReadState(stream)
            }
        }
        if wrote { scheduleFlush() }
    }

    /// Flushes the tunnel, then lets the streams in line write again.
    func flushTunnel() {
        unflushedData = 0
        context?.flush()
        judgeRate()
        if !sendQueue.isEmpty { sendQueued() }
    }

    /// Every ``TunnelLimits/rateInterval`` of traffic: a tunnel that was not writable at some point (its link is the
    /// bottleneck) and moved less than ``TunnelLimits/pacedBelowBytesPerSecond`` becomes paced; a paced one that
    /// moved more than ``TunnelLimits/fastAboveBytesPerSecond`` becomes fast. An idle tunnel keeps its mode.
    func judgeRate() {
        let now = eventLoop.now
        let elapsed = now - rateWindow.start
        guard elapsed >= limits.rateInterval else { return }
        let perSecond = Double(rateWindow.bytes) * 1e9 / Double(elapsed.nanoseconds)
        if !paced, rateWindow.blocked, perSecond < Double(limits.pacedBelowBytesPerSecond) {
            setPaced(true)
        } else if paced, perSecond > Double(limits.fastAboveBytesPerSecond) {
            setPaced(false)
        }
        rateWindow = (now, 0, false)
    }

    /// Switches the socket's unsent-bytes limit and the channel's watermarks with the mode.
    func setPaced(_ on: Bool) {
        paced = on
        guard let channel = context?.channel else { return }
        let lowat = on ? SocketTuning.pacedNotSentLowat : SocketTuning.unlimitedNotSentLowat
        let marks = on ? SocketTuning.pacedWriteBuffer : SocketTuning.fastWriteBuffer
        // Not every channel is a socket (tests run on EmbeddedChannel): the watermarks alone then.
        _ = try? channel.syncOptions?.setOption(SocketTuning.notSentLowatOption, value: lowat)
        _ = try? channel.syncOptions?.setOption(.writeBufferWaterMark, value: marks)
    }
}
