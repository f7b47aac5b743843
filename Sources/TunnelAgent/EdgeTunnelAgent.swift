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
    let group: EventLoopGroup
    /// The loop of every tunnel connection of this agent: a suspended tunnel's streams can move only to a new
    /// connection on their own loop (``TunnelMux/expectResume(from:)``).
    let tunnelLoop: EventLoop
    let ownsGroup: Bool
    let lock = NIOLock()
    /// Lookups of name targets, checked against the allow list before any connect.
    let lookups = NameLookups()
    private(set) var credentials: AgentCredentials?
    /// The TLS context of `credentials`, built at the first dial after they are set (see ``tunnelContext()``).
    private var credentialsContext: NIOSSLContext?
    var current: AgentTunnel?
    var activeAddress: String?
    var metaChannel: Channel?
    var stopping = false
    var retiredBytes = (bytesIn: 0, bytesOut: 0)
    /// The failover loop of ``run()``: ``stop()`` cancels it, which ends its backoff sleep and its waits at once.
    var failoverTask: Task<Void, Never>?
    /// Those waiting for a registered tunnel (``waitUntilConnected(within:)``): answered true by the first, false
    /// at their deadline or when the agent stops.
    var connectedWaiters: [EventLoopPromise<Bool>] = []
    /// The server addresses in order of preference; replaced when the addresses file changes.
    private var addresses: [String]
    /// The path marks of the addresses file's entries once it was re-read (nil: the configuration's). See ``AddressPaths``.
    let addressPathMarks = NIOLockedValueBox<[String: TunnelPath]?>(nil)
    /// Tunnels replaced by a newer one, finishing their streams.
    var lingering: [AgentTunnel] = []
    /// Tunnels whose connection was lost with streams open, by the replica that holds them: their streams wait
    /// to be resumed by the next connection to that replica (its HELLO names the token).
    var suspended: [String: (token: String, mux: TunnelMux)] = [:]
    /// After a server of the previous version refused this one's HELLO: until when the agent speaks that version.
    private var olderProtocolUntil: NIODeadline?
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
        // What a resumable tunnel keeps to send again: one stream at the largest window fits; past it, streams are
        // not resumable. (The receive windows have their own budget.)
        limits.maxRetained = configuration.bufferBudget / 4
        limits.processRetained = RetainedBudget(limit: configuration.bufferBudget / 2)  // over every replica's tunnel
        self.tunnelLimits = limits
        self.addresses = configuration.serverAddresses
        if let group {
            self.group = group
            self.ownsGroup = false
        } else {
            self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
            self.ownsGroup = true
        }
        self.tunnelLoop = self.group.next()
        _ = try DNSName.validateNodeName(configuration.nodeName)
        guard !configuration.serverAddresses.isEmpty else {
            throw ConfigurationError("no --server-address given")
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

    func setCredentials(_ credentials: AgentCredentials) {
        lock.withLock {
            self.credentials = credentials
            credentialsContext = nil
        }
        metrics.certificateExpiry.set(credentials.certificate.notValidAfter.timeIntervalSince1970)
    }

    /// The client TLS context of the node's credentials, for tunnels and path probes: built once per set of
    /// credentials (a join or a renewal sets new ones), not per dial. A context per dial parsed the certificate
    /// and loaded the key on every reconnect and probe; in a reconnect storm that was a quarter of the agents' CPU.
    func tunnelContext() throws -> NIOSSLContext {
        try lock.withLock {
            guard let credentials else { throw JoinError(description: "no credentials") }
            if let credentialsContext { return credentialsContext }
            let context = try TLSContexts.agentClient(
                certificate: credentials.certificate, key: credentials.privateKey, ca: credentials.ca)
            credentialsContext = context
            return context
        }
    }

    /// The registered primary tunnel, if any (the one the failover loop manages).
    var primary: AgentTunnel? { lock.withLock { current?.registered == true ? current : nil } }

    /// The server address of the registered tunnel, if any.
    public var connectedAddress: String? { lock.withLock { current?.registered == true ? activeAddress : nil } }

    /// The server addresses in force, in order of preference.
    public var serverAddresses: [String] { lock.withLock { addresses } }

    /// Replaces the address list (from the addresses file). A tunnel on an address that is no longer listed
    /// is drained and the agent reconnects; a newly preferred address is taken up by the fail-back check.
    public func setServerAddresses(_ new: [String]) throws {
        guard !new.isEmpty else { throw ConfigurationError("the server address list is empty") }
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
        let loop = Task { await self.keepTunnelUp() }
        let stopped = lock.withLock { () -> Bool in
            failoverTask = loop
            return stopping
        }
        if stopped { loop.cancel() }
        await withTaskCancellationHandler {
            await loop.value
        } onCancel: {
            loop.cancel()
        }
    }

    private func keepTunnelUp() async {
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
                // Streams waiting to resume have a grace period: dial again at least every second meanwhile.
                let delay = backoff(attempt: attempt)
                try? await Task.sleep(
                    for: .nanoseconds((hasSuspendedTunnels ? min(delay, .seconds(1)) : delay).nanoseconds))
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
        guard let context = try? tunnelContext() else { return false }
        do {
            let channel = try await TLSClient.connect(
                host: address.host, port: address.port, on: group.next(), context: context,
                serverHostname: address.isIP ? nil : address.host, within: configuration.connectTimeout)
            channel.close(promise: nil)
            return true
        } catch {
            return false
        }
    }

    /// `tunnel`'s connection was lost with streams open: they wait for a new connection to `serverID`.
    func tunnelSuspended(_ tunnel: AgentTunnel, serverID: String, token: String) {
        let (replaced, count) = lock.withLock { () -> (TunnelMux?, Int) in
            let previous = suspended[serverID]?.mux
            suspended[serverID] = (token, tunnel.mux)
            return (previous === tunnel.mux ? nil : previous, suspended.count)
        }
        metrics.suspendedTunnels.set(Int64(count))
        replaced?.abandonSuspended()
    }

    /// The tunnel's suspended streams ended (resumed, or their grace period is over). On the mux's loop.
    func suspendedEnded(_ mux: TunnelMux) {
        let (listed, count) = lock.withLock { () -> (Bool, Int) in
            let ids = suspended.filter { $0.value.mux === mux }.map(\.key)
            for id in ids { suspended[id] = nil }
            return (!ids.isEmpty, suspended.count)
        }
        guard listed else { return }
        metrics.suspendedTunnels.set(Int64(count))
        metrics.resumes.increment(mux.wasTakenOver ? "resumed" : "ended")
    }

    /// The tokens to name in a HELLO: every suspended tunnel's.
    var resumeTokens: [String]? {
        lock.withLock { suspended.isEmpty ? nil : Array(suspended.values.map(\.token).prefix(maxResumeTokens)) }
    }

    /// The suspended tunnel of `serverID`, to resume or abandon (it leaves the list when its streams end).
    func suspendedTunnel(serverID: String) -> TunnelMux? {
        lock.withLock { suspended[serverID]?.mux }
    }

    /// The protocol version the next HELLO claims: this build's, or the previous one after a server of that version
    /// refused this one's.
    var helloVersion: Int { lock.withLock { Self.helloVersion(olderProtocolUntil: olderProtocolUntil, now: .now()) } }

    /// How long the agent speaks the previous version after a server refused this one's; then it tries this one's
    /// again (the servers were rolled forward again: its tunnels become resumable without a restart).
    static let olderProtocolPeriod: TimeAmount = .minutes(10)

    static func helloVersion(olderProtocolUntil: NIODeadline?, now: NIODeadline) -> Int {
        guard let olderProtocolUntil, now < olderProtocolUntil else { return tunnelProtocolVersion }
        return oldestAgentProtocolVersion
    }

    /// A server of the previous version refused this one's HELLO.
    func useOlderProtocol() {
        let version = oldestAgentProtocolVersion
        lock.withLock { olderProtocolUntil = .now() + Self.olderProtocolPeriod }
        logger.warning(
            "the server speaks an older protocol: using version \(version), without resumable tunnels, for \(Self.olderProtocolPeriod.nanoseconds / 60_000_000_000) minutes; then version \(tunnelProtocolVersion) again"
        )
    }

    var hasSuspendedTunnels: Bool { lock.withLock { !suspended.isEmpty } }

    /// Full jitter: a random delay between 0 and min(cap, initial * 2^attempt), so that thousands of agents
    /// do not reconnect in lockstep after a server restart.
    func backoff(attempt: Int) -> TimeAmount {
        let ceiling = min(
            configuration.backoffCap.nanoseconds,
            configuration.backoffInitial.nanoseconds << min(attempt, 20))
        return .nanoseconds(Int64.random(in: 0...max(1, ceiling)))
    }

    var isStopping: Bool { Task.isCancelled || lock.withLock { stopping } }
}
