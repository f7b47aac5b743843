import NIOCore

/// Opening streams (server side), accepting or rejecting them (agent side), draining and idleness.
extension TunnelMux {
    /// Opens a stream to `target` (server side). The future completes once the peer answered OPEN_OK or
    /// OPEN_FAIL; after `.opened`, attach a ``StreamGlue`` for the stream id.
    ///
    /// `callerGone`: completes when the caller the stream is for has gone (its channel's `closeFuture`). A stream
    /// still opening then is cancelled: RST to the agent, which drops its dial or the target connection it made
    /// (an OPEN_OK that crossed the RST is dropped here), its window and its pending open given back, and the open
    /// answered ``OpenFail/callerGoneCode``. An opened stream whose socket never told the mux it closed is reset
    /// then too (see ``callerClosed(_:)``): without this, a caller that gave up during the dial left a stream and
    /// the agent's target connection open for good.
    public func openStream(
        target: String, until callerGone: EventLoopFuture<Void>? = nil
    ) -> EventLoopFuture<OpenResult> {
        let promise = eventLoop.makePromise(of: OpenResult.self)
        execute {
            guard let context = self.context, !self.connection.isEnding else {
                promise.succeed(.failed(OpenFail(code: 502, reason: "tunnel connection is closed")))
                return
            }
            guard self.connection.opensStreams else {
                promise.succeed(.failed(OpenFail(code: 503, reason: "tunnel connection is draining")))
                return
            }
            guard !self.resume.isTakingOver else {
                promise.succeed(.failed(OpenFail(code: 503, reason: "the agent's tunnel is resuming: try again")))
                return
            }
            guard self.nextStreamID <= self.limits.lastStreamID, self.nextStreamID <= UInt32.max - 2 else {
                // Every id is used: the agent reconnects on GOAWAY, and its new connection takes the next streams.
                self.connection.drain()
                self.writeFrame(
                    GoAway(reason: "stream ids exhausted: reconnect").frame(allocator: self.allocator), flush: true)
                promise.succeed(
                    .failed(
                        OpenFail(code: 503, reason: "stream ids of the tunnel exhausted: the agent is reconnecting")))
                return
            }
            guard self.streams.count < self.limits.maxStreams else {
                promise.succeed(
                    .failed(
                        OpenFail(
                            code: 503, reason: "the agent has \(self.streams.count) streams open, its limit",
                            limit: "streams_per_agent")))
                return
            }
            guard self.pendingOpens < self.limits.maxPendingOpens else {
                promise.succeed(
                    .failed(
                        OpenFail(
                            code: 503, reason: "\(self.pendingOpens) streams to the agent are still opening, its limit",
                            limit: "pending_opens")))
                return
            }
            guard let window = self.ledger.openWindow() else {
                promise.succeed(
                    .failed(
                        OpenFail(
                            code: 503, reason: "the server's stream buffer budget is exhausted", limit: "buffer_budget")
                    ))
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
                Open(target: target, window: stream.receive.size).frame(
                    streamID: id, allocator: context.channel.allocator))
            // After the OPEN: a caller already gone is acted on at once, and its RST must follow the OPEN.
            if let callerGone {
                let owner = Stream.Owner(self)
                stream.owner = owner
                callerGone.whenComplete { _ in owner.mux?.callerClosed(id) }
            }
        }
        return promise.futureResult
    }

    /// Cancels a stream that is still opening or open (the caller went away). A stream still opening answers its
    /// open as failed (``OpenFail/callerGoneCode``).
    public func cancelStream(_ streamID: UInt32) {
        execute {
            guard let stream = self.streams[streamID] else {
                self.successor?.cancelStream(streamID)
                return
            }
            self.reset(stream)
        }
    }

    /// The caller a stream was opened for has gone (``openStream(target:until:)``).
    ///
    /// - Still opening: cancelled (RST, budgets given back, the open answered as failed).
    /// - Open, and the glue saw its socket close: nothing to do. ``socketClosed(_:eof:)`` has reset the stream,
    ///   or, for a socket that ended in order, let go of the glue while the stream still sends what it holds and
    ///   then its FIN (its glue is nil, and its FIN is sent or waits behind those bytes).
    /// - Open otherwise: reset. No glue was attached, or one was attached after its socket had closed: NIO had
    ///   already passed `channelInactive` by then (a write of the 200 to a caller that had closed fails with EPIPE
    ///   and closes the channel at once, before the glue is added), so the glue never tells the mux, and nothing
    ///   else ever would.
    ///
    /// The channel's close reaches its glue (`channelInactive`) a loop tick before its `closeFuture` completes, and
    /// both hop here in that order, so the glue's word always comes first.
    func callerClosed(_ streamID: UInt32) {
        execute {
            guard let stream = self.streams[streamID] else {
                self.successor?.callerClosed(streamID)  // resumed on a new connection, or gone already
                return
            }
            if stream.openPromise == nil, stream.glue == nil, stream.finAfterPending || !stream.lifecycle.canSend {
                return  // its socket ended in order: what it sent goes out, then FIN
            }
            self.reset(
                stream,
                openFailure: OpenFail(
                    code: OpenFail.callerGoneCode, reason: "the caller went away while the stream was opening"))
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
            self.lastPingSent = self.eventLoop.now
            self.writeFrame(
                .ping(.ping, opaque: UInt64(NIODeadline.now().uptimeNanoseconds), allocator: self.allocator),
                flush: true)
        }
    }

    /// A keepalive PING while data moves: none when a PING of either kind went out within `skipWithin` (its PONG
    /// proves the path as well), and the confirming PING of ended streams when one is due, so that the two kinds
    /// together stay within the peer's PING rate (``TunnelLimits/pingsPerSecond``; 4 a second on older servers).
    public func keepalivePing(skipWithin: TimeAmount) {
        execute {
            guard self.eventLoop.now - self.lastPingSent >= skipWithin else { return }
            if !self.lingering.isEmpty, self.confirmPingsAnswered == self.confirmPingsSent {
                self.confirmTimer?.cancel()
                self.sendConfirmingPing()
                self.scheduleFlush()
                return
            }
            self.lastPingSent = self.eventLoop.now
            self.writeFrame(
                .ping(.ping, opaque: UInt64(NIODeadline.now().uptimeNanoseconds), allocator: self.allocator),
                flush: true)
        }
    }

    /// No new streams; open ones finish. Sends GOAWAY to the peer.
    public func drain(reason: String) {
        execute {
            self.connection.drain()
            self.writeFrame(GoAway(reason: reason).frame(allocator: self.allocator), flush: true)
        }
    }

    /// Marks this side as draining without telling the peer (it told us).
    public func markDraining() {
        execute { self.connection.drain() }
    }

    /// Number of open streams (on the loop).
    public var streamCount: Int { streams.count }

    /// Completes when no stream is open on this connection — at once if none is — or the connection closed:
    /// a drain waits for this event instead of polling the stream count.
    public func whenIdle() -> EventLoopFuture<Void> {
        let promise = eventLoop.makePromise(of: Void.self)
        execute {
            if self.streams.isEmpty || self.connection.isClosed {
                promise.succeed(())
            } else {
                self.idleWaiters.append(promise)
            }
        }
        return promise.futureResult
    }

    func notifyIfIdle() {
        guard streams.isEmpty, !idleWaiters.isEmpty else { return }
        let waiters = idleWaiters
        idleWaiters = []
        for waiter in waiters { waiter.succeed(()) }
    }
}

extension OpenFail {
    /// The code of an open that this side cancelled because its caller went away (nginx's "client closed
    /// request"). Never sent on the wire: the agent is told with RST.
    public static let callerGoneCode = 499
}
