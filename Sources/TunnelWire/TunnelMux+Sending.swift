import NIOCore

/// Sending DATA: streams take turns on the tunnel, and a tunnel whose link is slow is paced.
extension TunnelMux {
    /// Puts a stream with pending socket bytes and credit in line for the tunnel, and sends the FIN that waited
    /// behind bytes already sent. Nothing while the stream cannot send yet (the agent has not answered OPEN_OK):
    /// the socket's bytes wait, and its reading is paused.
    func flushPending(_ stream: Stream) {
        defer { updateReadState(stream) }
        guard context != nil, stream.lifecycle.canSend, !isFrozen(stream.id) else { return }
        if let pending = stream.pending {
            guard stream.send.available > 0, !stream.queuedToSend else { return }
            stream.queuedToSend = true
            // A small piece (a keystroke's echo, a short answer) goes ahead of the streams in line, in the order the
            // pieces came; a bulk stream still gets every fifth turn (``nextToSend()``), however many pieces come.
            if pending.readableBytes <= limits.pacedSharedFrameSize {
                urgentQueue.append(stream)
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
        if paced, socketHoldsEnoughUnsent(context.channel) { return }
        var wrote = false
        let flushBatch = paced ? limits.pacedFlushBatch : limits.fastFlushBatch
        while unflushedData < flushBatch, context.channel.isWritable, let stream = nextToSend() {
            stream.queuedToSend = false
            guard streams[stream.id] === stream, stream.lifecycle.canSend, var pending = stream.pending,
                stream.send.available > 0
            else { continue }
            let othersWait = !sendQueue.isEmpty || !urgentQueue.isEmpty
            let frameSize = !paced ? Frame.maxPayload : othersWait ? limits.pacedSharedFrameSize : limits.pacedFrameSize
            if rateWindow.bytes == 0 { rateWindow = (eventLoop.now, 0, false) }  // the window starts with traffic
            let count = min(pending.readableBytes, stream.send.available, frameSize)
            let slice = pending.readSlice(length: count)!
            if resumable, !stream.unresumable { retainToSendAgain(stream, slice) }
            stream.send.consume(count)
            counters.add(out: count)
            unflushedData += count
            rateWindow.bytes += count
            queuedData -= count
            send(Frame(type: .data, streamID: stream.id, payload: slice))
            wrote = true
            if pending.readableBytes > 0 {
                pending.makeKept()  // the tail of a read may wait for credit: it must not pin the whole read
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

    /// Keeps a DATA payload to send again after a resume, within ``TunnelLimits/maxRetained`` for the whole tunnel.
    /// Past that bound the stream gives up being resumable rather than wait: the peer may credit nothing until more
    /// comes (it credits in quarters of its window), so streams waiting for credit to free the bound could wait for
    /// good. Such a stream is reset if the connection is lost.
    /// Streams that ended and linger (TunnelMux+Lingering.swift) give way first, the oldest first.
    /// So is the process's bound (``TunnelLimits/processRetained``).
    func retainToSendAgain(_ stream: Stream, _ slice: ByteBuffer) {
        let count = slice.readableBytes
        guard ledger.retain(slice, for: stream) || (makeRoomForRetaining(count) && ledger.retain(slice, for: stream))
        else {
            stream.unresumable = true
            ledger.releaseRetained(stream)
            delegate?.muxStreamWillNotResume(self)
            return
        }
    }

    /// The next stream to send a frame: small pieces first, in their order, but after four of them in a row a
    /// stream of the main line gets its turn, so a stream of small pieces cannot starve a bulk one.
    func nextToSend() -> Stream? {
        if !urgentQueue.isEmpty, sendQueue.isEmpty || urgentInARow < 4 {
            urgentInARow += 1
            return urgentQueue.popFirst()
        }
        urgentInARow = 0
        return sendQueue.popFirst()
    }

    /// Whether a paced tunnel's socket already holds ``TunnelLimits/pacedUnsentLimit`` unsent bytes (or 3 ms of the
    /// measured rate, if more): then the DATA waits in the mux's lines, where a reply can still go first, and the
    /// tunnel looks again after ``TunnelLimits/pacedUnsentRecheck``. Counts as blocked for the rate judgement.
    func socketHoldsEnoughUnsent(_ channel: Channel) -> Bool {
        guard let unsent = unsentBytes(channel) else { return false }
        let limit = max(limits.pacedUnsentLimit, Int(measuredRate * 0.003))
        guard unsent >= limit else { return false }
        rateWindow.blocked = true
        if unsentRecheck == nil {
            unsentRecheck = eventLoop.scheduleTask(in: limits.pacedUnsentRecheck) { [weak self] in
                guard let self else { return }
                self.unsentRecheck = nil
                self.sendQueued()
            }
        }
        return true
    }

    /// Flushes the tunnel, then lets the streams in line write again. A tunnel still not writable after a flush has
    /// more to send than its socket takes: its link (or its peer) is the bottleneck.
    func flushTunnel() {
        unflushedData = 0
        context?.flush()
        if let context, !context.channel.isWritable { rateWindow.blocked = true }
        judgeRate()
        if !sendQueue.isEmpty || !urgentQueue.isEmpty { sendQueued() }
    }

    /// Every ``TunnelLimits/rateInterval`` from its first DATA: a tunnel that stayed not writable after a flush (its
    /// link is the bottleneck) and moved less than ``TunnelLimits/pacedBelowBytesPerSecond`` becomes paced; a paced
    /// one that moved more than ``TunnelLimits/fastAboveBytesPerSecond`` becomes fast. An idle tunnel keeps its mode.
    func judgeRate() {
        guard rateWindow.bytes > 0 else { return }
        let now = eventLoop.now
        let elapsed = now - rateWindow.start
        guard elapsed >= limits.rateInterval else { return }
        let perSecond = Double(rateWindow.bytes) * 1e9 / Double(elapsed.nanoseconds)
        measuredRate = perSecond
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
