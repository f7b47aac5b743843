import NIOCore

/// One stream as one side of a resume sees it (PROTOCOL.md, "Resuming a tunnel"). Offsets count the bytes of one
/// direction of the stream from its OPEN.
public struct ResumedStream: Codable, Sendable, Equatable {
    public var id: UInt32
    /// DATA bytes of the stream this side has received: the peer sends again from here.
    public var received: UInt64
    /// Of those, bytes this side consumed and credited back.
    public var credited: UInt64
    /// Credit the peer has beyond `received`: what is left of this side's receive window.
    public var window: Int
    /// This side has received the peer's FIN.
    public var fin: Bool

    public init(id: UInt32, received: UInt64, credited: UInt64, window: Int, fin: Bool) {
        self.id = id
        self.received = received
        self.credited = credited
        self.window = window
        self.fin = fin
    }
}

/// Either side, when a tunnel's streams move to a new connection: the streams it still holds, and how far each got.
/// The server sends its RESUME first; streams both sides list carry on, every other one is reset.
public struct Resume: ControlMessage, Equatable {
    public static let frameType = FrameType.resume
    public var streams: [ResumedStream]
    public init(streams: [ResumedStream]) { self.streams = streams }
}

extension Frame {
    /// On a WINDOW of a resumable tunnel: the increment grows the window; it does not credit consumed bytes, so
    /// the sender keeps its retained bytes.
    public static let windowGrowth: UInt8 = 0x1
}

/// Resuming: a resumable tunnel whose connection is lost keeps its streams, with their sockets open and unread,
/// for a grace period; a new connection of the same peer takes them over, each side sends again what the other
/// did not receive, and the callers and targets see a pause instead of an error.
extension TunnelMux {
    /// Makes this tunnel resumable (both sides agreed to at registration): each stream keeps the bytes it sent
    /// until the peer credits them as consumed, and a lost connection suspends the streams for `grace` instead of
    /// resetting them. Call before any stream opens.
    public func enableResume(grace: TimeAmount) {
        execute {
            self.resumable = true
            self.resumeGrace = grace
        }
    }

    /// The connection is closed on purpose (a drain finished, the peer was refused or revoked, the process
    /// stops): its streams end with it, not after a grace period.
    public func closeWithoutResume() {
        execute { self.resumeRefused = true }
    }

    /// Whether the tunnel is suspended: its connection is gone and its streams wait to be resumed. On the loop.
    public var isSuspended: Bool { connection.state == .suspended }

    /// Whether another connection took this tunnel's streams over (``takeOver(_:)``). On the loop.
    public var wasTakenOver: Bool { successor != nil }

    /// Ends a suspended tunnel's streams now (the peer came back, but the resume failed). Nothing otherwise.
    public func abandonSuspended() {
        execute {
            guard self.connection.state == .suspended else { return }
            self.shutdownStreams()
        }
    }

    /// The channel went away: a resumable tunnel with streams to keep suspends them; any other ends them.
    func connectionEnded() {
        guard connection.state != .suspended else { return }
        // Lingering streams count too, the peer may still wait for their last frames; but not on a draining
        // connection, which is closed on purpose once it has no stream left.
        let keeps =
            streams.values.contains { $0.lifecycle.state != .opening && !$0.unresumable }
            || (!lingering.isEmpty && connection.state == .open)
        if resumable, !resumeRefused, keeps, connection.suspend() {
            suspend()
        } else {
            shutdownStreams()
        }
    }

    /// Keeps the streams without a connection: their sockets stay open and unread (the tunnel counts as full),
    /// what arrives from them waits, and the streams end when the grace period does. A stream still opening, or
    /// one that kept nothing to send again (``retainToSendAgain(_:_:)``), cannot be resumed: it fails now.
    func suspend() {
        unsentRecheck?.cancel()
        unsentRecheck = nil
        confirmTimer?.cancel()
        confirmTimer = nil
        // Taken-over streams still frozen are suspended like the others: the next connection lists them again.
        resume.suspend()?.cancel()
        deliverQueued()
        decoder?.sink = nil
        decoder = nil
        encoder = nil
        context = nil
        sendQueue.removeAll()
        urgentQueue.removeAll()
        urgentInARow = 0
        unflushedData = 0
        inTunnelRead = false
        for stream in streams.values where stream.lifecycle.state == .opening || stream.unresumable {
            streams.removeValue(forKey: stream.id)
            _ = resume.noteReset(stream.id)
            streamRemoved(stream)
            stream.glue?.resetFromTunnel()
            stream.openPromise?.succeed(.failed(OpenFail(code: 502, reason: "tunnel connection lost while opening")))
            stream.openPromise = nil
        }
        for stream in streams.values {
            stream.queuedToSend = false
            updateReadState(stream)
        }
        resume.setTimer(
            eventLoop.scheduleTask(in: resumeGrace) { [weak self] in
                guard let self, self.connection.state == .suspended else { return }
                self.shutdownStreams()
            })
        delegate?.muxDidSuspend(self)
    }

    /// The stream was taken over and waits for the peer's RESUME: its socket is not read and nothing is sent.
    /// (The emptiness check first: on every tunnel that is not being resumed, no hashing per frame.)
    func isFrozen(_ streamID: UInt32) -> Bool {
        resume.isFrozen(streamID)
    }

    /// Frames of this stream wait: the connection is suspended, or the stream is frozen. A FIN waits too, behind
    /// the bytes to be sent again.
    func holdsFrames(of stream: Stream) -> Bool {
        context == nil || isFrozen(stream.id)
    }

    /// RST for a stream this side gave up; while suspended it goes out on the connection that resumes.
    func sendReset(_ streamID: UInt32) {
        if !resume.noteReset(streamID) {
            writeStreamFrame(.rst(streamID: streamID, code: .cancel, allocator: allocator))
        }
    }

    // MARK: Taking over

    /// Nothing to hand over but the stream ids used so far. On the loop.
    var idsOnly: HandedOver { HandedOver(nextStreamID: nextStreamID, lastPeerStreamID: lastPeerStreamID) }

    /// What a suspended mux hands to the one that resumes it.
    struct HandedOver {
        var streams: [Stream] = []
        /// Ended streams whose last frames the peer may not have (TunnelMux+Lingering.swift).
        var lingering: [Stream] = []
        var resets: [UInt32] = []
        var nextStreamID: UInt32 = 0
        var lastPeerStreamID: UInt32 = 0
    }

    /// Server side: takes over the streams of `old`, the suspended tunnel of the same agent, which came back
    /// within the grace period with that session's token (the caller checks both). This side's RESUME goes out
    /// at once; the streams stay frozen (sockets unread, nothing sent) until the agent's RESUME answers it. The
    /// number of streams taken, or nil when `old` is no longer suspended (its grace period ended, or another
    /// connection took it over).
    public func takeOver(_ old: TunnelMux) -> EventLoopFuture<Int?> {
        beginTakeOver()  // the registration may already route to this tunnel
        // Not taken (the grace period ended meanwhile): an empty RESUME, so that the agent resets its side too.
        // Its stream ids are carried over either way: the agent may have kept streams (or lingering ones) with
        // higher ids, and it refuses an OPEN at or below the last id it saw.
        if old.eventLoop === eventLoop, eventLoop.inEventLoop {
            return eventLoop.makeSucceededFuture(adoptTakenOver(old.handOver(to: self), ids: old.idsOnly))
        }
        return old.eventLoop.submit { (old.handOver(to: self), old.idsOnly) }
            .hop(to: eventLoop)
            .map { handed, ids in self.adoptTakenOver(handed, ids: ids) }
    }

    /// ``takeOver(_:)``'s end, on this loop: the streams handed over (or only the ids), and how many there were;
    /// nil when nothing was taken or this connection closed meanwhile.
    private func adoptTakenOver(_ handed: HandedOver?, ids: HandedOver) -> Int? {
        adopt(handed ?? ids, announce: true) == nil ? nil : handed?.streams.count
    }

    /// Server side: no stream opens on this tunnel until ``takeOver(_:)`` has taken the old tunnel's streams (and
    /// their ids) over; call before the agent is routable.
    public func beginTakeOver() {
        execute { self.resume.beginTakeOver() }
    }

    /// Agent side: the server's RESUME, when it comes on this connection, resumes the streams of `old`, the
    /// suspended tunnel this connection replaces. Both must run on the same event loop, so that the streams are
    /// taken over before the server's next frame is read. False (nothing changes) otherwise. Nil: the server said
    /// it resumes, but nothing waits here any more (the grace period ended meanwhile): its RESUME is answered with
    /// none, so that both sides reset their streams.
    @discardableResult
    public func expectResume(from old: TunnelMux?) -> Bool {
        if let old, old.eventLoop !== eventLoop { return false }
        execute { self.resume.expect(from: old) }
        return true
    }

    /// On the suspended mux's loop: gives the streams up to `successor`, to which their sockets' events are
    /// passed on from now on. Their windows stay reserved in the process budget: the streams go on.
    func handOver(to successor: TunnelMux) -> HandedOver? {
        guard connection.state == .suspended, let taken = resume.handOver(to: successor), connection.close() else {
            return nil
        }
        taken.timer?.cancel()
        let handed = HandedOver(
            streams: Array(streams.values), lingering: Array(lingering.values), resets: taken.resets,
            nextStreamID: nextStreamID, lastPeerStreamID: lastPeerStreamID)
        ledger.handOut(handed.streams)
        ledger.handOut(handed.lingering)
        assert(ledger.windows == 0 && ledger.retained == 0, "a stream's budget charge was not handed out")
        streams = [:]
        forgetLingering()
        queuedData = 0
        counters.setStreams(0)
        notifyIfIdle()
        delegate?.muxDidClose(self)
        delegate = nil
        return handed
    }

    /// Takes the handed-over streams in, frozen until the peer's RESUME, and (`announce`) sends this side's
    /// RESUME. Streams past ``TunnelLimits/maxResumedStreams`` are reset. Nil when this connection closed before the
    /// streams came (the takeover waited for the old connection to close): they end, and give back what they held.
    @discardableResult
    func adopt(_ handed: HandedOver, announce: Bool) -> Int? {
        guard !connection.isClosed else {
            resume.adopt(frozen: [], answerDue: false)?.cancel()
            for stream in handed.streams { endHandedOver(stream) }
            for stream in handed.lingering { ledger.release(stream) }
            return nil
        }
        nextStreamID = max(nextStreamID, handed.nextStreamID)
        lastPeerStreamID = max(lastPeerStreamID, handed.lastPeerStreamID)
        var listed: [ResumedStream] = []
        var frozen = Set<UInt32>()
        // RSTs go out after this side's RESUME: before it, the peer's new connection knows none of these ids.
        var resets = handed.resets
        for stream in handed.streams.sorted(by: { $0.id < $1.id }) {
            guard listed.count < limits.maxResumedStreams, streams[stream.id] == nil else {
                endHandedOver(stream)
                resets.append(stream.id)
                continue
            }
            streams[stream.id] = stream
            frozen.insert(stream.id)
            stream.glue?.moveToTunnel(self)
            stream.owner?.mux = self
            ledger.takeIn(stream)
            queuedData += stream.pending?.readableBytes ?? 0
            listed.append(
                ResumedStream(
                    id: stream.id, received: stream.received, credited: stream.credited,
                    window: stream.receive.outstanding, fin: stream.lifecycle.state == .halfClosedRemote))
        }
        // Ended here, maybe not there: listed as received in full (this side had the peer's FIN), and kept until
        // the peer's RESUME says whether it still waits for their last frames.
        for stream in handed.lingering.sorted(by: { $0.id < $1.id }) {
            guard listed.count < limits.maxResumedStreams, streams[stream.id] == nil, lingering[stream.id] == nil
            else {
                ledger.release(stream)
                continue
            }
            lingering[stream.id] = stream
            frozen.insert(stream.id)
            ledger.takeIn(stream)
            listed.append(
                ResumedStream(
                    id: stream.id, received: stream.received, credited: stream.credited,
                    window: stream.receive.outstanding, fin: true))
        }
        counters.setStreams(streams.count)
        // Frozen before anything is sent: from here no frame of theirs goes out until the peer's RESUME.
        resume.adopt(frozen: frozen, answerDue: announce && role == .server)?.cancel()
        if announce { send(Resume(streams: listed).frame(allocator: allocator)) }
        for id in resets { send(.rst(streamID: id, code: .cancel, allocator: allocator)) }
        for stream in streams.values { updateReadState(stream) }
        flushTunnel()
        if !frozen.isEmpty {
            // A peer that never answers must not hold the sockets: its streams are reset after the grace period.
            resume.setTimer(
                eventLoop.scheduleTask(in: resumeGrace) { [weak self] in
                    guard let self, self.resume.hasFrozen else { return }
                    self.reconcile(with: [])
                })
        }
        return listed.count
    }

    /// A handed-over stream that is not taken in: its socket is reset, and the process budgets get back its window
    /// and what it kept (counted there since they were taken; this connection never counted them).
    private func endHandedOver(_ stream: Stream) {
        ledger.release(stream)
        stream.lifecycle.reset()
        stream.glue?.resetFromTunnel()
    }

    /// A RESUME from the peer: it answers ours (server side), or it is the server's, which takes over the
    /// suspended tunnel this connection replaces (agent side, ``expectResume(from:)``).
    func receiveResume(_ frame: Frame) throws {
        let resume = try Resume(frame: frame)
        if self.resume.answerDue {
            reconcile(with: resume.streams)
        } else if role == .agent, let old = self.resume.takeExpected() {
            adopt(old?.handOver(to: self) ?? HandedOver(), announce: true)
            reconcile(with: resume.streams)
        } else {
            throw FrameError("RESUME that was not expected")
        }
    }

    /// Both sides' lists are known. A stream both listed carries on: its bytes the peer did not receive go again,
    /// then a FIN the peer did not get, then what waited. Every other stream is reset, on both sides.
    func reconcile(with peer: [ResumedStream]) {
        let (adopted, timer) = resume.thaw()
        timer?.cancel()
        var theirs: [UInt32: ResumedStream] = [:]
        for entry in peer.prefix(limits.maxResumedStreams) where theirs[entry.id] == nil { theirs[entry.id] = entry }
        for id in adopted.sorted() {
            if let stream = streams[id] {
                if let entry = theirs.removeValue(forKey: id), sendAgain(stream, from: entry) { continue }
                reset(stream)
            } else if let ended = lingering[id] {
                // The peer lists it: it waits for what is sent again here. Not listed: it has it all, and ended too.
                // Listed with our FIN and every byte: nothing to send again either.
                guard let entry = theirs.removeValue(forKey: id), !(entry.fin && entry.received == ended.sent) else {
                    forgetLingering(id)
                    continue
                }
                if !sendAgain(ended, from: entry) {
                    forgetLingering(id)
                    writeStreamFrame(.rst(streamID: id, code: .cancel, allocator: allocator))
                }
            }
        }
        // Listed by the peer alone: it resets them itself, but a stream it kept by mistake must not hang.
        for id in theirs.keys.sorted() { writeStreamFrame(.rst(streamID: id, code: .cancel, allocator: allocator)) }
        for id in adopted.sorted() {
            if let stream = streams[id] { flushPending(stream) }
        }
        restartLingering()
        flushTunnel()
    }

    /// Sends again what the peer did not receive of `stream`, and restores its credit. False when the peer's
    /// account cannot be true (more received than sent, less than is still retained, credit that the sender never
    /// had): that stream is reset.
    func sendAgain(_ stream: Stream, from entry: ResumedStream) -> Bool {
        let sentFin = stream.lifecycle.state == .halfClosedLocal || stream.lifecycle.state == .closed
        guard entry.received >= stream.retainedFrom, entry.received <= stream.sent, entry.credited <= entry.received,
            entry.window >= 0, entry.window <= limits.maximumWindow,
            UInt64(entry.window) >= stream.sent - entry.received,
            !entry.fin || (sentFin && entry.received == stream.sent)
        else { return false }
        ledger.releaseRetained(stream, upTo: entry.received)
        stream.peerCredited = entry.credited  // later WINDOWs count on from here
        stream.send = SendWindow(initial: entry.window - stream.retainedBytes)
        stream.queuedToSend = false
        for slice in stream.retained ?? [] {
            counters.add(out: slice.readableBytes)
            send(Frame(type: .data, streamID: stream.id, payload: slice))
        }
        if sentFin, !entry.fin { send(.fin(streamID: stream.id, allocator: allocator)) }
        return true
    }
}
