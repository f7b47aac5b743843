import NIOCore
import NIOPosix
import NIOSSL
import TunnelPKI
import TunnelSupport
import TunnelWire

/// Dialing a server: the TCP connection, the replica probe before TLS, TLS, HELLO and registration.
extension EdgeTunnelAgent {
    /// Dials `address` and registers. `primary`: the tunnel becomes the agent's current one (its renewal runs on
    /// it); otherwise it is a tunnel to another replica: `probes` connections at once ask which replica the
    /// Service picked (``ReplicaProbe``), the first to reach one not in `haveServers` goes on with TLS, and a
    /// replica named in `haveServers` also refuses the registration itself.
    func connect(
        to address: ServerAddress, haveServers: [String] = [], primary: Bool = true, probes: Int = 1
    )
        async throws -> AgentTunnel
    {
        let context = try tunnelContext()
        // A name is checked against the certificate's DNS SANs; an IP cannot be SNI, and NIOSSL then checks
        // the certificate's IP SANs against the address it connected to.
        let hostname = address.isIP ? nil : address.host
        let addTunnelHandlers: @Sendable (Channel, AgentTunnel) throws -> Void = { channel, tunnel in
            let sync = channel.pipeline.syncOperations
            try sync.addHandler(NIOSSLClientHandler(context: context, serverHostname: hostname))
            try sync.addHandler(FrameDecoder(maxPayload: Frame.maxUnregisteredPayload))
            try sync.addHandler(FrameEncoder())
            try sync.addHandler(tunnel.mux)
            try sync.addHandler(AgentTunnelErrorHandler(tunnel: tunnel))
        }
        let channel: Channel
        let tunnel: AgentTunnel
        if primary {
            let loop = tunnelLoop
            let fresh = AgentTunnel(agent: self, address: address, eventLoop: loop)
            do {
                channel = try await tunnelBootstrap(on: loop)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture { try addTunnelHandlers(channel, fresh) }
                    }
                    .connect(hostOrLiteral: address.host, port: address.port).get()
            } catch {
                fresh.abandon(error)  // no connection: its promises end here, and the tunnel-mux cycle with them
                throw error
            }
            tunnel = fresh
        } else {
            channel = try await probeReplicas(address, haveServers: haveServers, count: probes)
            let fresh = AgentTunnel(agent: self, address: address, eventLoop: channel.eventLoop)
            do {
                try await channel.eventLoop.submit { try addTunnelHandlers(channel, fresh) }.get()
            } catch {
                channel.close(promise: nil)
                fresh.abandon(error)  // its promises end here, and the tunnel-mux cycle with them
                throw error
            }
            tunnel = fresh
        }
        let loop = channel.eventLoop
        tunnel.channel = channel
        tunnel.mux.sendControl(
            Hello(
                version: helloVersion, nodeName: configuration.nodeName,
                nodeIPs: configuration.nodeIPs.map(\.description),
                haveServers: haveServers.isEmpty ? nil : haveServers,
                resumeTokens: helloVersion >= 3 ? resumeTokens : nil,
                pool: configuration.pool, path: path(of: address).rawValue))
        let timeout = loop.scheduleTask(in: configuration.connectTimeout * 2) {
            tunnel.registration.fail(JoinError(description: "server \(address) did not answer HELLO in time"))
            channel.close(promise: nil)
        }
        do {
            try await tunnel.registration.futureResult.get()
            timeout.cancel()
        } catch {
            timeout.cancel()
            channel.close(promise: nil)
            throw error
        }
        tunnel.startKeepalive()
        guard primary else { return tunnel }
        makePrimary(tunnel)
        logger.info("tunnel registered", metadata: ["server": "\(address)", "serverID": "\(tunnel.serverID ?? "?")"])
        return tunnel
    }

    /// `count` connections to `address` at once, each asking which replica it reached; the first that reached one
    /// not in `haveServers` is returned (TLS not yet started), the others are closed. Throws ``DuplicateServer``
    /// when every one reached a held replica.
    func probeReplicas(_ address: ServerAddress, haveServers: [String], count: Int) async throws -> Channel {
        try await withThrowingTaskGroup(of: ReplicaProbeResult.self) { group in
            for _ in 0..<max(1, count) {
                group.addTask {
                    do { return try await self.probeReplica(address, haveServers: haveServers) } catch {
                        return .failed
                    }
                }
            }
            var winner: Channel?
            var pace: Int64?
            for try await result in group {
                switch result {
                case .reached(let channel):
                    if winner == nil { winner = channel } else { channel.close(promise: nil) }
                case .held(let paceMilliseconds):
                    if let paceMilliseconds { pace = max(pace ?? 0, paceMilliseconds) }
                case .failed:
                    break
                }
            }
            guard let winner else {
                throw DuplicateServer(
                    reason: "\(count) dial(s) of \(address) reached replicas already held, or failed",
                    paceMilliseconds: pace)
            }
            return winner
        }
    }

    private enum ReplicaProbeResult: Sendable {
        /// A replica not held: the raw connection, TLS not yet started.
        case reached(Channel)
        /// A replica already held, with the pace it asked for.
        case held(paceMilliseconds: Int64?)
        case failed
    }

    /// One connection asking which replica it reached: the raw channel if not one of `haveServers`.
    private func probeReplica(_ address: ServerAddress, haveServers: [String]) async throws -> ReplicaProbeResult {
        let loop = tunnelLoop
        let answered = loop.makePromise(of: ReplicaProbe.Answer.self)
        let channel: Channel
        do {
            channel = try await tunnelBootstrap(on: loop)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ReplicaProbeAsker(answered: answered))
                    }
                }
                .connect(hostOrLiteral: address.host, port: address.port).get()
        } catch {
            answered.fail(error)  // a promise must be completed, also when the connection never came up
            throw error
        }
        let timer = loop.scheduleTask(in: configuration.connectTimeout) {
            answered.fail(ReplicaProbeError(description: "no answer to the replica question in time"))
        }
        defer { timer.cancel() }
        do {
            let answer = try await answered.futureResult.get()
            guard !haveServers.contains(answer.serverID) else {
                channel.close(promise: nil)
                return .held(paceMilliseconds: answer.paceMilliseconds)
            }
            return .reached(channel)
        } catch {
            channel.close(promise: nil)
            throw error
        }
    }

    /// A connection towards a server: the connect timeout, and the source address if one is configured.
    private func tunnelBootstrap(on loop: EventLoop) throws -> ClientBootstrap {
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(configuration.connectTimeout)
            .streamConnection(halfClosure: false)
        guard let source = configuration.sourceAddress else { return bootstrap }
        return bootstrap.bind(to: try SocketAddress(ipAddress: source.description, port: 0))
    }

    /// `tunnel` (new, or a replica's promoted) becomes the one the failover loop serves on.
    func makePrimary(_ tunnel: AgentTunnel) {
        let waiters = lock.withLock { () -> [EventLoopPromise<Bool>] in
            current = tunnel
            activeAddress = tunnel.address.text
            guard tunnel.registered else { return [] }
            defer { connectedWaiters = [] }
            return connectedWaiters
        }
        for waiter in waiters { waiter.succeed(true) }
        metrics.connected.set(Int64(1))
        metrics.setActive(tunnel.address.text)
        scheduleRenewal(tunnel)
        replicas.check()
    }

    /// Returns true once a tunnel is up and registered with a server (at once if one is), false if none is within
    /// `timeout` or the agent stops first. For readiness without polling (`edgetunnel demo`, tests).
    public func waitUntilConnected(within timeout: TimeAmount) async -> Bool {
        let waiter = group.any().makePromise(of: Bool.self)
        let answered = lock.withLock { () -> Bool? in
            if stopping { return false }
            if current?.registered == true { return true }
            connectedWaiters.append(waiter)
            return nil
        }
        if let answered { waiter.succeed(answered) }
        let timer = waiter.futureResult.eventLoop.scheduleTask(in: timeout) { waiter.succeed(false) }
        let connected = (try? await waiter.futureResult.get()) ?? false
        timer.cancel()
        if !connected { lock.withLock { connectedWaiters.removeAll { $0.futureResult === waiter.futureResult } } }
        return connected
    }
}
