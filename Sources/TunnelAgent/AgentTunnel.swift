import NIOConcurrencyHelpers
import NIOCore
import TunnelPKI
import TunnelWire
import X509

/// One tunnel connection of the agent.
final class AgentTunnel: TunnelMuxDelegate, @unchecked Sendable {
    unowned let agent: EdgeTunnelAgent
    let address: ServerAddress
    let mux: TunnelMux
    let registration: EventLoopPromise<Void>
    /// Completes when no new streams can come on this tunnel (``Life/unusable(serverID:dead:)``): for those who
    /// wait on it.
    private let unusable: EventLoopPromise<Void>
    /// Guarded by the agent's lock: byte counts were moved to the agent's totals.
    var retired = false

    /// Where the connection is in its life. It moves forward only: `connecting` → `registered` → `unusable`, or
    /// `connecting` → `unusable` (it never registered). Each state carries what is known in it, so that no
    /// combination of flags (registered but never named, dead but usable) can be written.
    enum Life: Equatable, Sendable {
        /// Dialed, TLS, HELLO sent: no HELLO_OK yet.
        case connecting
        /// HELLO_OK came, naming the replica this tunnel reached.
        case registered(serverID: String)
        /// No new streams can come on it: it closed or was lost, the server said GOAWAY, its address was removed,
        /// or (`dead`) keepalive found the server silent. `serverID` if it had registered.
        case unusable(serverID: String?, dead: Bool)
    }

    /// The life and the channel are written on the tunnel's loop (or by the dialing task) and read from anywhere:
    /// the failover loop, ``ReplicaTunnels`` and the meta port run on other threads.
    private let life = NIOLockedValueBox(Life.connecting)
    private let channelBox = NIOLockedValueBox<Channel?>(nil)

    var channel: Channel? {
        get { channelBox.withLockedValue { $0 } }
        set { channelBox.withLockedValue { $0 = newValue } }
    }
    var state: Life { life.withLockedValue { $0 } }
    /// HELLO_OK came (it stays true once the tunnel becomes unusable).
    var registered: Bool { serverID != nil }
    /// The replica this tunnel reached (from HELLO_OK).
    var serverID: String? {
        switch state {
        case .connecting: return nil
        case .registered(let id): return id
        case .unusable(let id, _): return id
        }
    }
    /// Keepalive found the server silent.
    var declaredDead: Bool {
        if case .unusable(_, dead: true) = state { return true }
        return false
    }
    /// Whether no new streams can come on this tunnel any more.
    var isUnusable: Bool {
        if case .unusable = state { return true }
        return false
    }

    /// HELLO_OK: `connecting` → `registered` (a tunnel already unusable stays so, now named). False, and no
    /// change, once it has registered: a server answers HELLO once.
    func register(serverID: String) -> Bool {
        life.withLockedValue { life in
            switch life {
            case .connecting: life = .registered(serverID: serverID)
            case .unusable(nil, let dead): life = .unusable(serverID: serverID, dead: dead)
            case .registered, .unusable: return false
            }
            return true
        }
    }

    /// → `unusable` (from any state; `dead` sticks once set), and those waiting are told.
    func markUnusable(dead: Bool = false) {
        life.withLockedValue { life in
            switch life {
            case .connecting: life = .unusable(serverID: nil, dead: dead)
            case .registered(let id): life = .unusable(serverID: id, dead: dead)
            case .unusable(let id, let wasDead): life = .unusable(serverID: id, dead: wasDead || dead)
            }
        }
        unusable.succeed(())
    }

    var pendingRenewalKey: Certificate.PrivateKey?
    private var keepalive: Scheduled<Void>?
    /// The token of this tunnel's streams (HELLO_OK, version 3): named in a later HELLO to resume them. On the loop.
    private var resumeToken: String?

    init(agent: EdgeTunnelAgent, address: ServerAddress, eventLoop: EventLoop) {
        self.agent = agent
        self.address = address
        self.mux = TunnelMux(role: .agent, eventLoop: eventLoop, limits: agent.tunnelLimits)
        self.registration = eventLoop.makePromise()
        self.unusable = eventLoop.makePromise()
        mux.delegate = self
    }

    /// The connection never came up: the promises are completed and the mux lets go of this tunnel.
    func abandon(_ error: Error) {
        registration.fail(error)
        markUnusable()
        // On the mux's loop: a failed connect also removes the mux from its pipeline there, which drops the
        // delegate too; two unordered stores of nil released this tunnel twice (a crash in a 10,000-agent swarm).
        mux.detachDelegate()
    }

    func whenUnusable(_ body: @escaping @Sendable () -> Void) {
        unusable.futureResult.whenComplete { _ in body() }
    }

    /// Whether the tunnel became unusable within `timeout`; true at once when the waiting task is cancelled.
    func waitUnusable(timeout: TimeAmount) async -> Bool {
        let result = mux.eventLoop.makePromise(of: Bool.self)
        let timer = mux.eventLoop.scheduleTask(in: timeout) { result.succeed(false) }
        unusable.futureResult.whenComplete { _ in
            timer.cancel()
            result.succeed(true)
        }
        return await withTaskCancellationHandler {
            (try? await result.futureResult.get()) ?? true
        } onCancel: {
            timer.cancel()
            result.succeed(true)
        }
    }

    func startKeepalive() {
        guard mux.eventLoop.inEventLoop else {
            // `keepalive` is read on the loop (muxDidClose): written there too.
            mux.eventLoop.execute { self.startKeepalive() }
            return
        }
        let rule = Keepalive(
            interval: agent.configuration.keepaliveInterval, deadAfter: agent.configuration.keepaliveTimeout,
            pingOnlyWhenQuiet: false, active: agent.configuration.activeKeepalive)
        keepaliveTick(rule, after: .seconds(1), moved: 0, movedAt: .now())
    }

    /// One keepalive check, then the next: every second while the tunnel is idle, every 100 ms while data moved on it
    /// in the last 2 s (then a lost path is found within ``Keepalive/Active/deadAfter``). A chain of one-shot timers,
    /// so that ten thousand idle tunnels cost one timer a second each, as before.
    private func keepaliveTick(_ rule: Keepalive, after delay: TimeAmount, moved: Int, movedAt: NIODeadline) {
        keepalive = mux.eventLoop.scheduleTask(in: delay) { [weak self] in
            guard let self else { return }
            var rule = rule
            let now = NIODeadline.now()
            let counts = self.mux.counters.snapshot
            let total = counts.bytesIn &+ counts.bytesOut
            let lastMove = total != moved ? now : movedAt
            // Only a resumable tunnel is judged fast: its streams continue on the next connection. On one that
            // cannot resume (a server of version 2, or --resume-grace-seconds 0) a false alarm would reset them all.
            let active = self.resumeToken != nil && now - lastMove < .seconds(2)
            var lastSign = self.mux.lastFrameReceived
            var lossAtLeast = TimeAmount.zero
            if active, let channel = self.channel, let path = SocketTuning.pathTiming(channel) {
                // The server's TCP acknowledging our bytes is a sign of life too: on a slow line its frames (a
                // PONG) can wait behind a queue of our own bulk data for longer than the fast rule allows. And a
                // path with a long round trip gets the time its own retransmissions need.
                lastSign = max(lastSign, now - path.sinceLastAck)
                lossAtLeast = path.shortestLoss
            }
            switch rule.check(now: now, lastFrame: lastSign, isActive: active, lossAtLeast: lossAtLeast) {
            case .dead:
                let silent = (now - lastSign).nanoseconds / 1_000_000
                self.agent.logger.warning(
                    "no answer from server \(self.address) for \(silent) ms\(active ? " while data moved" : ""): tunnel is dead"
                )
                // Move on at once: closing a dead TLS connection waits for a close_notify that never comes. Closed
                // from under TLS, so that its streams suspend before the next dial names their token.
                self.markUnusable(dead: true)
                if let channel = self.channel { StreamGlue.closeFromHead(channel) }
                return
            case .ping:
                if active { self.mux.keepalivePing(skipWithin: .milliseconds(400)) } else { self.mux.ping() }
            case .nothing:
                break
            }
            self.keepaliveTick(rule, after: active ? .milliseconds(100) : .seconds(1), moved: total, movedAt: lastMove)
        }
    }

    func mux(_ mux: TunnelMux, didReceiveOpen open: Open, streamID: UInt32) {
        agent.open(open, streamID: streamID, mux: mux)
    }

    func mux(_ mux: TunnelMux, didReceiveControl frame: Frame) {
        switch frame.type {
        case .helloOK:
            let ok = try? HelloOK(frame: frame)
            guard register(serverID: ok.map { PeerText.bounded($0.serverID, limit: 253) } ?? "?") else {
                // A server answers HELLO once. A second HELLO_OK could name another replica and claim to resume
                // that replica's streams without their token: a protocol error, the tunnel closes.
                agent.logger.error("server \(address) sent a second HELLO_OK: closing the tunnel")
                mux.closeWithoutResume()
                if let channel { StreamGlue.closeFromHead(channel) }
                return
            }
            mux.peerRegistered()
            if let ok { resume(ok) }
            registration.succeed(())
            agent.replicas.learned(count: ok?.serverCount ?? 1)
        case .serverCount:
            if let announced = try? ServerCount(frame: frame) { agent.replicas.learned(count: announced.count) }
        case .refused:
            let refused = try? Refused(frame: frame)
            let reason = refused.map { PeerText.bounded($0.reason) } ?? "no reason given"
            if refused?.duplicate == true, !registered {
                registration.fail(DuplicateServer(reason: reason))
                return
            }
            mux.closeWithoutResume()  // refused on purpose (revoked, reset): nothing to resume
            if !registered, let refused, refused.refusesProtocolVersion(tunnelProtocolVersion) {
                // A server of the previous version (a rollout, a rollback): spoken to without resuming.
                agent.useOlderProtocol()
            }
            agent.logger.error("server \(address) refused the tunnel: \(reason)")
            registration.fail(JoinError(description: "server refused the registration: \(reason)"))
        case .goaway:
            let reason = (try? GoAway(frame: frame).reason).map { PeerText.bounded($0) } ?? ""
            agent.logger.info(
                "server \(address) is draining (\(reason)); open streams finish on it, new ones go to a new tunnel")
            mux.markDraining()
            mux.closeWithoutResume()  // a drained connection closes on purpose: what outlives it ends
            // Reconnect at once so new streams reach this node (another replica, the restarted server, or the
            // new path); this connection closes when its streams are done.
            markUnusable()
        case .renewOK:
            if let key = pendingRenewalKey, let ok = try? RenewOK(frame: frame) {
                pendingRenewalKey = nil
                agent.renewed(ok, key: key)
            }
        default:
            break
        }
    }

    /// HELLO_OK: a resumable tunnel, and maybe the one that resumes this agent's suspended tunnel to the replica.
    /// On the loop, before the next frame (the server's RESUME) is read.
    private func resume(_ ok: HelloOK) {
        if let token = ok.resumeToken, let grace = ok.resumeGraceSeconds, grace > 0 {
            resumeToken = token
            mux.enableResume(grace: .milliseconds(Int64(min(grace, 600) * 1000)))
        }
        // The suspended tunnel stays listed until its streams are taken over (RESUME) or end: if this connection
        // drops before the server's RESUME, the next HELLO still names it.
        let old = serverID.flatMap { agent.suspendedTunnel(serverID: $0) }
        if ok.resumed == true {
            if mux.expectResume(from: old) {
                agent.logger.info("server \(address) resumes the streams of the lost tunnel")
                return
            }
            mux.expectResume(from: nil)  // answered with none: both sides reset
        }
        guard let old else { return }
        agent.logger.warning("server \(address) could not resume the lost tunnel's streams: they end")
        old.abandonSuspended()
    }

    /// The connection was lost with streams open: they wait for the next connection to this replica.
    func muxDidSuspend(_ mux: TunnelMux) {
        keepalive?.cancel()
        if let serverID, let resumeToken {
            agent.logger.warning(
                "tunnel to \(address) lost: its \(mux.streamCount) open streams and \(mux.lingeringCount) that just ended wait to resume"
            )
            agent.tunnelSuspended(self, serverID: serverID, token: resumeToken)
        }
        markUnusable()
    }

    func muxDidClose(_ mux: TunnelMux) {
        agent.suspendedEnded(mux)
        keepalive?.cancel()
        registration.fail(JoinError(description: "server \(address) closed the connection"))
        markUnusable()
    }
}

/// Logs and closes on tunnel errors (handshake failures: wrong certificate, refused).
final class AgentTunnelErrorHandler: ChannelInboundHandler {
    typealias InboundIn = Any
    /// Strong: once the mux lets go of the tunnel, this handler may still see an error (the pipeline goes with the
    /// channel, so there is no lasting cycle).
    let tunnel: AgentTunnel

    init(tunnel: AgentTunnel) { self.tunnel = tunnel }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        tunnel.agent.logger.warning("tunnel to \(tunnel.address) failed: \(error)")
        tunnel.registration.fail(error)
        context.close(promise: nil)
    }
}
