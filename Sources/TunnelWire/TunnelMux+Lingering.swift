import NIOCore

/// Streams that ended while their last frames may still have been on the way: a stream ends on one side once it has
/// sent its FIN and received the peer's, but the FIN it sent last (and the DATA before it) may be lost with the
/// connection. The peer then still waits for them, and without what this side kept it could only reset the stream
/// after a resume. So on a resumable tunnel an ended stream lingers, holding its accounting and the bytes the peer
/// has not credited, until a PING sent after it ended comes back: the peer reads frames in order, so by its PONG it
/// has received everything before.
extension TunnelMux {
    /// Marks this mux's own PINGs (``sendConfirmingPing()``); keepalive PINGs carry the uptime, which never sets it.
    static let confirmingPing: UInt64 = 1 << 63
    /// The shortest time between two confirming PINGs. One is in flight at a time: a stalled direction cannot make
    /// them pile up into a burst past the peer's limit (``TunnelLimits/pingsPerSecond``), and with the keepalive's
    /// one every 3 s they stay well inside it.
    static let confirmingPingInterval: TimeAmount = .milliseconds(500)

    /// How many ended streams are kept until the peer confirms them.
    public var lingeringCount: Int { lingering.count }

    /// `stream` ended (FIN both ways) on a resumable tunnel: kept until the next confirming PING comes back, at most
    /// ``TunnelLimits/maxResumedStreams`` of them (the oldest go first: the peer most likely has them).
    func linger(_ stream: Stream) {
        stream.glue = nil  // nothing more reaches its socket
        lingering[stream.id] = stream
        if lingeringOrder.count >= 2 * limits.maxResumedStreams {
            // Entries of streams let go by an RST stay in line until confirmed; a peer that resets them and never
            // answers PINGs must not make the line grow.
            lingeringOrder = CircularBuffer(lingeringOrder.filter { lingering[$0.id] != nil })
        }
        lingeringOrder.append((stream.id, confirmPingsSent + 1))
        while lingering.count > limits.maxResumedStreams, let oldest = lingeringOrder.popFirst() {
            forgetLingering(oldest.id)
        }
        scheduleConfirmingPing()
    }

    func forgetLingering(_ id: UInt32) {
        guard let stream = lingering.removeValue(forKey: id) else { return }
        ledger.releaseRetained(stream)
    }

    /// Lets every lingering stream go (the tunnel ends; its retained total is reset by the caller).
    func forgetLingering() {
        confirmTimer?.cancel()
        confirmTimer = nil
        lingering = [:]
        lingeringOrder.removeAll()
    }

    /// A live stream needs `count` more retained bytes than the tunnel's or the process's bound allows: this
    /// tunnel's lingering streams give theirs up, the oldest first, before a live stream stops being resumable.
    /// Whether any was let go (then it is worth trying again).
    func makeRoomForRetaining(_ count: Int) -> Bool {
        var freed = false
        while !ledger.retainFits(count),
            let oldest = lingeringOrder.popFirst()
        {
            freed = lingering[oldest.id] != nil || freed
            forgetLingering(oldest.id)
        }
        return freed
    }

    /// A confirming PING goes out soon, unless one is due or in flight already, or nothing waits for one.
    func scheduleConfirmingPing() {
        guard confirmTimer == nil, confirmPingsAnswered == confirmPingsSent, context != nil, !lingering.isEmpty
        else { return }
        let wait = max(.zero, lastConfirmPing + Self.confirmingPingInterval - eventLoop.now)
        confirmTimer = eventLoop.scheduleTask(in: wait) { [weak self] in self?.sendConfirmingPing() }
    }

    func sendConfirmingPing() {
        confirmTimer = nil
        guard context != nil, !lingering.isEmpty else { return }
        confirmPingsSent += 1
        lastConfirmPing = eventLoop.now
        lastPingSent = lastConfirmPing
        // Flushed with the frames around it, not in a TLS record of its own.
        writeStreamFrame(.ping(.ping, opaque: Self.confirmingPing | confirmPingsSent, allocator: allocator))
    }

    /// A PONG: if it answers the confirming PING in flight, the streams that ended before that PING went out are let
    /// go, and the next PING may follow for those that ended since.
    func confirmed(_ pong: Frame) {
        guard confirmPingsAnswered < confirmPingsSent, pong.payload.readableBytes == 8,
            let opaque = pong.payload.getInteger(at: pong.payload.readerIndex, as: UInt64.self),
            opaque == Self.confirmingPing | confirmPingsSent  // a PONG for another PING confirms nothing
        else { return }
        confirmPingsAnswered = confirmPingsSent
        while let first = lingeringOrder.first, first.ping <= confirmPingsAnswered {
            lingeringOrder.removeFirst()
            forgetLingering(first.id)
        }
        scheduleConfirmingPing()
    }

    /// After a resume: the lingering streams the peer did not list are gone from it too; the others were sent
    /// again and wait for a confirming PING on this connection.
    func restartLingering() {
        lingeringOrder = CircularBuffer(lingering.keys.sorted().map { (id: $0, ping: confirmPingsSent + 1) })
        scheduleConfirmingPing()
    }
}
