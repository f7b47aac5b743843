import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOTLS
import TunnelPKI
import TunnelSupport
import TunnelWire
import X509

/// The EdgeTunnel agent: dials out to the server, keeps the tunnel up (keepalive, reconnect with exponential
/// backoff and full jitter), and dials the targets the server asks for when the allow list permits them.
public final class EdgeTunnelAgent: @unchecked Sendable {
    public let configuration: AgentConfiguration
    let logger: Logger
    let metrics: AgentMetrics
    /// The limits of every tunnel of this agent: one buffer budget shared by all of them (``AgentConfiguration/bufferBudget``).
    let tunnelLimits: TunnelLimits
    private let group: EventLoopGroup
    private let ownsGroup: Bool
    private let lock = NIOLock()
    private var credentials: AgentCredentials?
    private var current: AgentTunnel?
    private var activeAddress: String?
    private var metaChannel: Channel?
    private var stopping = false
    private var retiredBytes = (bytesIn: 0, bytesOut: 0)
    private var wakeUp: CheckedContinuation<Void, Never>?
    /// The server addresses in order of preference; replaced when the addresses file changes.
    private var addresses: [String]
    /// Tunnels replaced by a newer one, finishing their streams.
    private var lingering: [AgentTunnel] = []
    /// The tunnels to the other server replicas; set at the end of `init` (a `lazy var` first touched from two
    /// threads at once would be built twice, and one freed while in use).
    private(set) var replicas: ReplicaTunnels!

    public init(configuration: AgentConfiguration, logger: Logger, group: EventLoopGroup? = nil) throws {
        self.configuration = configuration
        self.logger = logger
        self.metrics = AgentMetrics(serverAddresses: configuration.serverAddresses)
        var limits = TunnelLimits()
        limits.connectionWindowBudget = configuration.bufferBudget / 3
        limits.processBudget = WindowBudget(limit: configuration.bufferBudget)
        limits.minimumWindow = 4 * 1024
        self.tunnelLimits = limits
        self.addresses = configuration.serverAddresses
        if let group {
            self.group = group
            self.ownsGroup = false
        } else {
            self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
            self.ownsGroup = true
        }
        _ = try DNSName.validateNodeName(configuration.nodeName)
        guard !configuration.serverAddresses.isEmpty else {
            throw PKIError(.invalidArgument, "no --server-address given")
        }
        for address in configuration.serverAddresses { _ = try ServerAddress(parsing: address) }
        replicas = ReplicaTunnels(agent: self)
    }

    /// Loads the node's credentials, or joins with the bootstrap token when there are none.
    /// Fails with a clear message when neither works.
    public func prepareCredentials() async throws {
        let paths = configuration.paths
        do {
            let loaded = try AgentCredentials.load(paths: paths, nodeName: configuration.nodeName)
            setCredentials(loaded)
            logger.info("using node certificate \(paths.agentCertificate)")
            return
        } catch let error as PKIError where error.code == .fileMissing {
            // No credentials yet: join below.
        } catch {
            guard configuration.bootstrapToken != nil else { throw error }
            logger.warning("existing credentials unusable (\(error)); joining again with the bootstrap token")
        }
        guard let token = configuration.bootstrapToken else {
            throw JoinError(
                description: "no node certificate in \(paths.directory) and no --bootstrap-token to join with")
        }
        guard let hash = configuration.caCertHash else {
            throw JoinError(description: "--ca-cert-hash is required to join (edgetunnel pki ca-hash prints it)")
        }
        var lastError: Error?
        for text in configuration.serverAddresses {
            let address = try ServerAddress(parsing: text)
            do {
                let joined = try await JoinClient.join(
                    address: address, token: token, caCertHash: hash, nodeName: configuration.nodeName,
                    nodeIPs: configuration.nodeIPs, group: group,
                    timeout: configuration.connectTimeout * 2, logger: logger)
                try joined.write(to: paths)
                setCredentials(joined)
                return
            } catch {
                logger.warning("join via \(address) failed: \(error)")
                lastError = error
            }
        }
        throw lastError ?? JoinError(description: "join failed")
    }

    /// Uses credentials made elsewhere instead of the PKI folder (the swarm benchmark issues thousands in memory).
    public func useCredentials(_ credentials: AgentCredentials) {
        setCredentials(credentials)
    }

    private func setCredentials(_ credentials: AgentCredentials) {
        lock.withLock { self.credentials = credentials }
        metrics.certificateExpiry.set(credentials.certificate.notValidAfter.timeIntervalSince1970)
    }

    /// Serves `/healthz`, `/readyz` and `/metrics` on the meta port (loopback by default).
    public func startMeta() async throws {
        let channel = try await MetaHTTPServer.bind(
            host: configuration.metaBindAddress, port: configuration.metaPort, group: group
        ) { [weak self] _, path in
            self?.route(path) ?? .text(.serviceUnavailable, "stopping")
        }
        lock.withLock { metaChannel = channel }
    }

    public var metaPort: Int { lock.withLock { metaChannel?.localAddress?.port ?? 0 } }

    /// The registered primary tunnel, if any (the one the failover loop manages).
    var primary: AgentTunnel? { lock.withLock { current?.registered == true ? current : nil } }

    /// The server address of the registered tunnel, if any.
    public var connectedAddress: String? { lock.withLock { current?.registered == true ? activeAddress : nil } }

    /// The server addresses in force, in order of preference.
    public var serverAddresses: [String] { lock.withLock { addresses } }

    /// Replaces the address list (from the addresses file). A tunnel on an address that is no longer listed
    /// is drained and the agent reconnects; a newly preferred address is taken up by the fail-back check.
    public func setServerAddresses(_ new: [String]) throws {
        guard !new.isEmpty else { throw PKIError(.invalidArgument, "the server address list is empty") }
        for address in new { _ = try ServerAddress(parsing: address) }
        let (changed, tunnel) = lock.withLock { () -> (Bool, AgentTunnel?) in
            let changed = addresses != new
            addresses = new
            return (changed, current)
        }
        guard changed else { return }
        metrics.setAddresses(new)
        metrics.setActive(connectedAddress)
        logger.info("server addresses are now \(new.joined(separator: ", "))")
        if let tunnel, !new.contains(tunnel.address.text) {
            logger.info("\(tunnel.address) is no longer a server address: moving")
            tunnel.markUnusable()
        }
    }

    /// Keeps a tunnel up until ``stop()``: the first address that works, the next one when it dies, and back
    /// to a more preferred address once it has been healthy for two checks in a row (10 s apart).
    public func run() async {
        replicas.start(on: group.next())
        var attempt = 0
        var first = true
        var startAfter: String?
        while !isStopping {
            if !first { metrics.reconnects.increment() }
            first = false
            let list = serverAddresses
            // After a tunnel died, try the addresses after it first; the fail-back check returns later.
            var order = list
            if let dead = startAfter, let index = list.firstIndex(of: dead) {
                order = Array(list[(index + 1)...]) + Array(list[...index])
            }
            startAfter = nil
            // A healthy tunnel to another replica on the preferred address takes over without a dial.
            var tunnel: AgentTunnel?
            for text in order where tunnel == nil {  // not a lazy map: promote(for:) takes the tunnel out
                tunnel = replicas.promote(for: text)
            }
            if let promoted = tunnel { makePrimary(promoted) }
            for text in order where !isStopping && tunnel == nil {
                do {
                    tunnel = try await connect(to: try ServerAddress(parsing: text))
                    break
                } catch {
                    logger.warning("skipping server \(text): \(Self.describe(error, address: text))")
                }
            }
            if isStopping { break }
            guard var active = tunnel else {
                attempt += 1
                await sleep(backoff(attempt: attempt))
                continue
            }
            attempt = 0
            // Serve on this tunnel; replace it by a more preferred one when that is healthy again.
            while !isStopping {
                let outcome = await serve(active)
                guard case .failBack(let better) = outcome else { break }
                retireTunnel(active)
                active = better
            }
            if isStopping { break }
            let died = active.channel?.isActive != true || active.declaredDead
            retireTunnel(active)
            if died {
                startAfter = active.address.text
                logger.warning("tunnel to \(active.address) is down; moving on")
            }
        }
    }

    enum ServeOutcome {
        case unusable
        case failBack(AgentTunnel)
    }

    /// Waits until `tunnel` becomes unusable, checking every 10 s whether a more preferred address works again.
    private func serve(_ tunnel: AgentTunnel) async -> ServeOutcome {
        var healthy: [String: Int] = [:]
        while !isStopping {
            if await tunnel.waitUnusable(timeout: configuration.failBackInterval) { return .unusable }
            let list = serverAddresses
            guard let index = list.firstIndex(of: tunnel.address.text), index > 0 else {
                if !list.contains(tunnel.address.text) { return .unusable }
                continue
            }
            for text in list[..<index] {
                guard let address = try? ServerAddress(parsing: text) else { continue }
                if await probe(address) {
                    healthy[text, default: 0] += 1
                } else {
                    healthy[text] = 0
                }
                // Hysteresis: two healthy checks in a row before moving, so a flapping path is not chased.
                guard healthy[text, default: 0] >= 2 else { continue }
                do {
                    let better = try await connect(to: address)
                    logger.info("preferred server \(text) is healthy again: moved from \(tunnel.address)")
                    return .failBack(better)
                } catch {
                    healthy[text] = 0
                    logger.warning("preferred server \(text) looked healthy but the tunnel failed: \(error)")
                }
            }
        }
        return .unusable
    }

    /// A TLS handshake with the node certificate, verified against the CA: the path and the server work.
    func probe(_ address: ServerAddress) async -> Bool {
        guard let credentials = lock.withLock({ credentials }),
            let context = try? TLSContexts.agentClient(
                certificate: credentials.certificate, key: credentials.privateKey, ca: credentials.ca)
        else { return false }
        let loop = group.next()
        let done = loop.makePromise(of: Void.self)
        let hostname = address.isIP ? nil : address.host
        do {
            let channel = try await ClientBootstrap(group: loop)
                .connectTimeout(configuration.connectTimeout)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: context, serverHostname: hostname))
                        try channel.pipeline.syncOperations.addHandler(HandshakeWaiter(promise: done))
                    }
                }
                .connect(host: address.host, port: address.port).get()
            let timer = loop.scheduleTask(in: configuration.connectTimeout) {
                done.fail(JoinError(description: "handshake timed out"))
            }
            let ok = (try? await done.futureResult.get()) != nil
            timer.cancel()
            channel.close(promise: nil)
            return ok
        } catch {
            done.fail(error)
            return false
        }
    }

    /// A replaced tunnel: no new streams come on it (the server drains it); close it once its streams end,
    /// however long they run (its keepalive still closes it if the path dies).
    func retireTunnel(_ tunnel: AgentTunnel) {
        lock.withLock { lingering.append(tunnel) }
        tunnel.mux.whenIdle().whenComplete { [weak self] _ in
            tunnel.channel?.close(promise: nil)
            self?.retire(tunnel)
        }
    }

    /// Full jitter: a random delay between 0 and min(cap, initial * 2^attempt), so that thousands of agents
    /// do not reconnect in lockstep after a server restart.
    func backoff(attempt: Int) -> TimeAmount {
        let ceiling = min(
            configuration.backoffCap.nanoseconds,
            configuration.backoffInitial.nanoseconds << min(attempt, 20))
        return .nanoseconds(Int64.random(in: 0...max(1, ceiling)))
    }

    private func sleep(_ amount: TimeAmount) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let resumeNow = lock.withLock { () -> Bool in
                if stopping { return true }
                wakeUp = continuation
                return false
            }
            if resumeNow {
                continuation.resume()
                return
            }
            group.any().scheduleTask(in: amount) { [weak self] in self?.wake() }
        }
    }

    private func wake() {
        let continuation = lock.withLock { () -> CheckedContinuation<Void, Never>? in
            defer { wakeUp = nil }
            return wakeUp
        }
        continuation?.resume()
    }

    var isStopping: Bool { lock.withLock { stopping } }

    /// Drains: tells the server to send no new streams, lets open streams finish for up to the drain timeout,
    /// then closes the tunnel and the meta port.
    public func stop() async {
        let (tunnel, meta, old) = lock.withLock { () -> (AgentTunnel?, Channel?, [AgentTunnel]) in
            stopping = true
            return (current, metaChannel, lingering)
        }
        for replaced in old { replaced.channel?.close(promise: nil) }
        wake()
        let all = (tunnel.map { [$0] } ?? []) + replicas.takeAll()
        for tunnel in all { tunnel.mux.drain(reason: "agent shutting down") }
        for tunnel in all {
            await tunnel.mux.whenIdle().orTimeout(configuration.drainTimeout)
            try? await tunnel.channel?.close()
        }
        try? await meta?.close()
    }

    /// After ``stop()`` and once ``run()`` has returned: waits for a dial still under way, then shuts down the
    /// event loops the agent made itself (a loop shut down under a connection attempt would leak its promises).
    public func shutdown() async {
        await replicas.finishDials()
        if ownsGroup { try? await group.shutdownGracefully() }
    }

    private func retire(_ tunnel: AgentTunnel) {
        let counters = tunnel.mux.counters.snapshot
        let wasCurrent = lock.withLock { () -> Bool in
            guard !tunnel.retired else { return false }
            tunnel.retired = true
            retiredBytes.bytesIn += counters.bytesIn
            retiredBytes.bytesOut += counters.bytesOut
            lingering.removeAll { $0 === tunnel }
            guard current === tunnel else { return false }
            current = nil
            activeAddress = nil
            return true
        }
        if wasCurrent {
            metrics.connected.set(Int64(0))
            metrics.setActive(nil)
        }
    }

    /// Dials `address` and registers. `primary`: the tunnel becomes the agent's current one (its renewal runs on
    /// it); otherwise it is a tunnel to another replica: `probes` connections at once ask which replica the
    /// Service picked (``ReplicaProbe``), the first to reach one not in `haveServers` goes on with TLS, and a
    /// replica named in `haveServers` also refuses the registration itself.
    func connect(to address: ServerAddress, haveServers: [String] = [], primary: Bool = true, probes: Int = 1)
        async throws -> AgentTunnel
    {
        guard let credentials = lock.withLock({ credentials }) else {
            throw JoinError(description: "no credentials")
        }
        let context = try TLSContexts.agentClient(
            certificate: credentials.certificate, key: credentials.privateKey, ca: credentials.ca)
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
            let loop = group.next()
            let fresh = AgentTunnel(agent: self, address: address, eventLoop: loop)
            do {
                channel = try await ClientBootstrap(group: loop)
                    .connectTimeout(configuration.connectTimeout)
                    .streamConnection(halfClosure: false)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture { try addTunnelHandlers(channel, fresh) }
                    }
                    .connect(host: address.host, port: address.port).get()
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
            Hello(nodeName: configuration.nodeName, nodeIPs: configuration.nodeIPs.map(\.description),
                  haveServers: haveServers.isEmpty ? nil : haveServers))
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
                    do { return try await self.probeReplica(address, haveServers: haveServers) } catch { return .failed }
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
        let loop = group.next()
        let answered = loop.makePromise(of: ReplicaProbe.Answer.self)
        let channel: Channel
        do {
            channel = try await ClientBootstrap(group: loop)
                .connectTimeout(configuration.connectTimeout)
                .streamConnection(halfClosure: false)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ReplicaProbeAsker(answered: answered))
                    }
                }
                .connect(host: address.host, port: address.port).get()
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

    /// `tunnel` (new, or a replica's promoted) becomes the one the failover loop serves on.
    private func makePrimary(_ tunnel: AgentTunnel) {
        lock.withLock {
            current = tunnel
            activeAddress = tunnel.address.text
        }
        metrics.connected.set(Int64(1))
        metrics.setActive(tunnel.address.text)
        scheduleRenewal(tunnel)
        replicas.check()
    }

    /// Asks for a new certificate over the tunnel once two thirds of the current one's life have passed;
    /// while an answer is outstanding (or the server refused), asks again no sooner than 30 s later.
    private func scheduleRenewal(_ tunnel: AgentTunnel, notBefore minimum: Double = 0) {
        guard let credentials = lock.withLock({ credentials }) else { return }
        // Re-check at least hourly: a long sleep would not survive a suspended machine's clock jump.
        let delay = min(max(minimum, credentials.renewalTime.timeIntervalSinceNow, 0.5), 3600)
        tunnel.channel?.eventLoop.scheduleTask(in: .milliseconds(Int64(delay * 1000))) { [weak self, weak tunnel] in
            guard let self, let tunnel, tunnel.channel?.isActive == true else { return }
            guard let current = self.lock.withLock({ self.credentials }), Date() >= current.renewalTime else {
                self.scheduleRenewal(tunnel)
                return
            }
            self.requestRenewal(tunnel)
            self.scheduleRenewal(tunnel, notBefore: 30)
        }
    }

    private func requestRenewal(_ tunnel: AgentTunnel) {
        do {
            let (csrPEM, key) = try AgentCredentials.makeCSR(nodeName: configuration.nodeName)
            tunnel.pendingRenewalKey = key
            tunnel.mux.sendControl(RenewRequest(csrPEM: csrPEM))
            logger.info("requesting a renewed node certificate")
        } catch {
            logger.warning("cannot make a renewal request: \(error)")
        }
    }

    func renewed(_ ok: RenewOK, key: Certificate.PrivateKey) {
        do {
            guard let old = lock.withLock({ credentials }) else { return }
            let certificate = try Certificate(pemEncoded: ok.certificatePEM)
            guard certificate.publicKey == key.publicKey,
                old.ca.publicKey.isValidSignature(certificate.signature, for: certificate)
            else {
                logger.warning("server returned a renewed certificate that does not match our request")
                return
            }
            let renewed = AgentCredentials(certificate: certificate, privateKey: key, ca: old.ca)
            try renewed.write(to: configuration.paths)
            setCredentials(renewed)
            logger.info("node certificate renewed", metadata: [
                "notAfter": "\(Timestamps.iso8601(certificate.notValidAfter))",
            ])
        } catch {
            logger.warning("cannot store the renewed certificate: \(error)")
        }
    }

    // MARK: Streams

    /// Maps a requested target to what the agent dials: its own node name and `localhost` mean loopback.
    func resolveTarget(_ target: String) -> HostPort? {
        guard var hostPort = HostPort(authority: target) else { return nil }
        if hostPort.host == configuration.nodeName.lowercased() || hostPort.host == "localhost" {
            hostPort.host = "127.0.0.1"
        }
        return hostPort
    }

    func open(_ open: Open, streamID: UInt32, mux: TunnelMux) {
        guard let target = resolveTarget(open.target) else {
            mux.rejectStream(streamID, code: 400, reason: "target \"\(PeerText.bounded(open.target))\" is not host:port")
            return
        }
        guard configuration.allowList.allows(host: target.host, port: target.port) else {
            metrics.refused.increment()
            logger.warning("refused stream to \(target): not on the allow list")
            mux.rejectStream(streamID, code: 403, reason: "\(target) is not on the allow list of node \(configuration.nodeName)")
            return
        }
        let loop = mux.eventLoop
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(configuration.dialTimeout)
            .streamConnection(halfClosure: true)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        StreamGlue(mux: mux, streamID: streamID, eventLoop: channel.eventLoop))
                }
            }
        // An IP target is dialled directly: the resolver and Happy Eyeballs machinery of connect(host:port:)
        // cost more than the connect itself, which matters at thousands of new streams a second.
        let connected: EventLoopFuture<Channel>
        if let address = try? SocketAddress(ipAddress: target.host, port: target.port) {
            connected = bootstrap.connect(to: address)
        } else {
            connected = bootstrap.connect(host: target.host, port: target.port)
        }
        let byName = IPAddress(target.host) == nil
        let allowList = configuration.allowList
        connected
            .whenComplete { [weak self] result in
                guard let self else { return }
                switch result {
                case .success(let channel):
                    if byName, let ip = channel.remoteAddress?.ipAddress.flatMap(IPAddress.init),
                        !allowList.allowsResolved(ip, port: target.port)
                    {
                        self.metrics.refused.increment()
                        self.logger.warning("refused stream to \(target): the name resolved to \(ip), which no address rule allows")
                        mux.rejectStream(streamID, code: 403, reason: "\(target.host) resolved to \(ip), which the allow list of node "
                            + "\(self.configuration.nodeName) does not allow by address")
                        channel.close(promise: nil)
                        return
                    }
                    mux.acceptStream(streamID)
                case .failure(let error):
                    let (code, reason) = Self.classify(error, target: target)
                    self.metrics.dialFailed(reason: code == 504 ? "timeout" : "unreachable")
                    self.logger.info("cannot reach \(target): \(reason)")
                    mux.rejectStream(streamID, code: code, reason: reason)
                }
            }
    }

    /// A connection failure in an operator's words.
    static func describe(_ error: Error, address: String) -> String {
        if let ssl = error as? NIOSSLExtraError, ssl == .failedToValidateHostname {
            return "its certificate does not name \(address): add the address to the server's certIPs or certDNSNames"
        }
        if case NIOSSLError.handshakeFailed = error {
            return "TLS handshake failed (\(error)): is it an EdgeTunnel server of this CA?"
        }
        if case ChannelError.connectTimeout = error {
            return "no answer within the connect timeout (black-holed or down)"
        }
        return "\(error)"
    }

    static func classify(_ error: Error, target: HostPort) -> (Int, String) {
        if case ChannelError.connectTimeout = error {
            return (504, "\(target) did not answer in time")
        }
        if let io = error as? IOError, io.errnoCode == ECONNREFUSED {
            return (502, "\(target) refused the connection")
        }
        if let connect = error as? NIOConnectionError {
            if connect.connectionErrors.contains(where: { ($0.error as? IOError)?.errnoCode == ECONNREFUSED }) {
                return (502, "\(target) refused the connection")
            }
            if connect.connectionErrors.contains(where: { if case ChannelError.connectTimeout = $0.error { true } else { false } }) {
                return (504, "\(target) did not answer in time")
            }
            if connect.dnsAError != nil || connect.dnsAAAAError != nil, connect.connectionErrors.isEmpty {
                return (502, "\(target.host) cannot be resolved")
            }
        }
        return (502, "\(target) is unreachable: \(error)")
    }

    // MARK: Meta

    private func route(_ path: String) -> MetaResponse {
        switch path {
        case "/healthz", "/livez":
            return .text(.ok, "ok")
        case "/readyz":
            if let address = connectedAddress {
                let count = replicas.count
                guard count > 1 else { return .text(.ok, "ok: tunnel up via \(address)") }
                return .text(.ok, "ok: tunnel up via \(address) (\(1 + replicas.extras.count) of \(count) server replicas)")
            }
            return .text(.serviceUnavailable, "tunnel down")
        case "/metrics":
            let (tunnel, retired) = lock.withLock { (current, retiredBytes) }
            var counters = tunnel?.mux.counters.snapshot ?? (bytesIn: 0, bytesOut: 0, streams: 0)
            for extra in replicas.extras {
                let more = extra.mux.counters.snapshot
                counters = (counters.bytesIn + more.bytesIn, counters.bytesOut + more.bytesOut, counters.streams + more.streams)
            }
            return MetaResponse(
                status: .ok, contentType: "text/plain; version=0.0.4; charset=utf-8",
                body: metrics.render(
                    bytesIn: retired.bytesIn + counters.bytesIn, bytesOut: retired.bytesOut + counters.bytesOut,
                    streamCount: counters.streams))
        default:
            return .text(.notFound, "no such endpoint: \(path)")
        }
    }
}

/// One tunnel connection of the agent.
final class AgentTunnel: TunnelMuxDelegate, @unchecked Sendable {
    unowned let agent: EdgeTunnelAgent
    let address: ServerAddress
    let mux: TunnelMux
    var channel: Channel?
    let registration: EventLoopPromise<Void>
    /// Completes when no new streams can come on this tunnel: it closed, the server said GOAWAY, or its
    /// address was removed.
    private let unusable: EventLoopPromise<Void>
    var registered = false
    /// The replica this tunnel reached (from HELLO_OK).
    private(set) var serverID: String?
    /// Guarded by the agent's lock: byte counts were moved to the agent's totals.
    var retired = false
    /// Keepalive found the server silent.
    var declaredDead = false
    var pendingRenewalKey: Certificate.PrivateKey?
    private var keepalive: RepeatedTask?

    init(agent: EdgeTunnelAgent, address: ServerAddress, eventLoop: EventLoop) {
        self.agent = agent
        self.address = address
        self.mux = TunnelMux(role: .agent, eventLoop: eventLoop, limits: agent.tunnelLimits)
        self.registration = eventLoop.makePromise()
        self.unusable = eventLoop.makePromise()
        mux.delegate = self
        unusable.futureResult.whenComplete { [unusableFlag] _ in unusableFlag.withLockedValue { $0 = true } }
    }

    func markUnusable() {
        unusable.succeed(())
    }

    /// The connection never came up: the promises are completed and the mux lets go of this tunnel.
    func abandon(_ error: Error) {
        registration.fail(error)
        unusable.succeed(())
        // On the mux's loop: a failed connect also removes the mux from its pipeline there, which drops the
        // delegate too; two unordered stores of nil released this tunnel twice (a crash in a 10,000-agent swarm).
        mux.detachDelegate()
    }

    /// Whether no new streams can come on this tunnel any more.
    var isUnusable: Bool { unusableFlag.withLockedValue { $0 } }
    private let unusableFlag = NIOLockedValueBox(false)

    func whenUnusable(_ body: @escaping @Sendable () -> Void) {
        unusable.futureResult.whenComplete { _ in body() }
    }

    /// Whether the tunnel became unusable within `timeout`.
    func waitUnusable(timeout: TimeAmount) async -> Bool {
        let result = mux.eventLoop.makePromise(of: Bool.self)
        let timer = mux.eventLoop.scheduleTask(in: timeout) { result.succeed(false) }
        unusable.futureResult.whenComplete { _ in
            timer.cancel()
            result.succeed(true)
        }
        return (try? await result.futureResult.get()) ?? true
    }

    func startKeepalive() {
        guard mux.eventLoop.inEventLoop else {
            // `keepalive` is read on the loop (muxDidClose): written there too.
            mux.eventLoop.execute { self.startKeepalive() }
            return
        }
        let interval = agent.configuration.keepaliveInterval
        let deadAfter = agent.configuration.keepaliveTimeout
        var lastPing = NIODeadline.now()
        keepalive = mux.eventLoop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { [weak self] _ in
            guard let self else { return }
            let now = NIODeadline.now()
            if now - self.mux.lastFrameReceived > deadAfter {
                self.agent.logger.warning("no answer from server \(self.address) for \(deadAfter.nanoseconds / 1_000_000_000)s: tunnel is dead")
                self.keepalive?.cancel()
                // Move on at once: closing a dead TLS connection waits for a close_notify that never comes.
                self.declaredDead = true
                self.markUnusable()
                self.channel?.close(promise: nil)
            } else if now - lastPing >= interval {
                lastPing = now
                self.mux.ping()
            }
        }
    }

    func mux(_ mux: TunnelMux, didReceiveOpen open: Open, streamID: UInt32) {
        agent.open(open, streamID: streamID, mux: mux)
    }

    func mux(_ mux: TunnelMux, didReceiveControl frame: Frame) {
        switch frame.type {
        case .helloOK:
            let ok = try? HelloOK(frame: frame)
            serverID = ok.map { PeerText.bounded($0.serverID, limit: 253) } ?? "?"
            registered = true
            mux.peerRegistered()
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
            agent.logger.error("server \(address) refused the tunnel: \(reason)")
            registration.fail(JoinError(description: "server refused the registration: \(reason)"))
        case .goaway:
            let reason = (try? GoAway(frame: frame).reason).map { PeerText.bounded($0) } ?? ""
            agent.logger.info("server \(address) is draining (\(reason)); open streams finish on it, new ones go to a new tunnel")
            mux.markDraining()
            // Reconnect at once so new streams reach this node (another replica, the restarted server, or the
            // new path); this connection closes when its streams are done.
            unusable.succeed(())
        case .renewOK:
            if let key = pendingRenewalKey, let ok = try? RenewOK(frame: frame) {
                pendingRenewalKey = nil
                agent.renewed(ok, key: key)
            }
        default:
            break
        }
    }

    func muxDidClose(_ mux: TunnelMux) {
        keepalive?.cancel()
        registration.fail(JoinError(description: "server \(address) closed the connection"))
        unusable.succeed(())
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
