import Foundation
#if canImport(Glibc)
import Glibc
#endif
import KubeAPI
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import TunnelPKI
import TunnelSupport
import TunnelWire
import X509

/// State shared by every listener of one server.
///
/// The TLS contexts are swapped as a whole when the serving certificate changes: every new handshake reads
/// the current context when its connection is accepted, connections already open keep theirs.
final class TunnelServerCore: @unchecked Sendable {
    let configuration: ServerConfiguration
    let logger: Logger
    let registry = AgentRegistry()
    let metrics = ServerMetrics()
    let limits: TunnelLimits
    let callerStreams: CallerStreams
    let joins: JoinGuard
    let identities: NodeIdentities
    private let clientCA: NIOSSLTrustRoots
    private let lock = NIOLock()
    private var _authority: CertificateAuthority
    private var _tunnelContext: NIOSSLContext
    private var _callerContext: NIOSSLContext
    private var _serving: Certificate
    private var _sans: ServerSANs
    /// TLS client context for the kubelets behind Host-routed HTTPS requests.
    let kubeletClientContext: NIOSSLContext
    private var _serverCount: Int
    private var _nodeDirectory: NodeDirectory?

    private var _joinState: KubeJoinState?
    /// Tokens and node records in Kubernetes objects (``TunnelServer/useJoinState``); nil: the PKI folder.
    var joinState: KubeJoinState? { lock.withLock { _joinState } }
    func setJoinState(_ state: KubeJoinState) {
        lock.withLock { _joinState = state }
        joins.useTokens { state.knownTokens }
        refreshIdentities()
    }

    /// Takes the node records the join state holds now (after the watch or this replica's own join changed them).
    func refreshIdentities() {
        guard let state = joinState else { return }
        identities.replace(state.knownRecords, synced: state.isSynced)
    }

    /// The cluster's Node objects when the server checks agents against them (``TunnelServer/useNodeObjects``).
    var nodeDirectory: NodeDirectory? { lock.withLock { _nodeDirectory } }
    func setNodeDirectory(_ directory: NodeDirectory) { lock.withLock { _nodeDirectory = directory } }

    /// How many server replicas there are (``ServerConfiguration/serverCount``, or the Leases): every agent keeps
    /// a tunnel to each.
    var serverCount: Int { lock.withLock { _serverCount } }

    /// How long an agent that probed this replica but already holds it waits before its next probe
    /// (``ReplicaProbe``), at least 1 s. Every agent missing a replica probes at about this pace, and the Service
    /// spreads the probes over the replicas: the agents held here over (``ServerConfiguration/replicaProbeRate``
    /// × replicas) keeps each replica near that rate.
    var replicaProbePace: TimeAmount {
        let seconds = Double(registry.count) / Double(max(1, configuration.replicaProbeRate) * max(1, serverCount))
        return .milliseconds(Int64(min(max(seconds, 1), 300) * 1000))
    }

    /// A new replica count: told to every registered agent, which dials more tunnels or stops dialing.
    func setServerCount(_ count: Int) {
        let changed = lock.withLock { () -> Bool in
            guard count != _serverCount else { return false }
            _serverCount = count
            return true
        }
        guard changed else { return }
        metrics.replicas.set(Int64(count))
        logger.info("server replicas: \(count)")
        for session in registry.sessions { session.mux.sendControl(ServerCount(count: count)) }
    }

    init(configuration: ServerConfiguration, logger: Logger) throws {
        self.configuration = configuration
        self.logger = logger
        self._serverCount = configuration.serverCount
        self.joins = JoinGuard(store: TokenStore(paths: configuration.paths))
        var limits = TunnelLimits()
        limits.maxStreams = configuration.maxStreamsPerAgent
        limits.maxPendingOpens = configuration.maxPendingOpensPerAgent
        limits.openTimeout = configuration.dialTimeout
        limits.processBudget = WindowBudget(limit: configuration.maxBufferedBytes)
        self.limits = limits
        self.callerStreams = CallerStreams(limit: configuration.maxStreamsPerCaller)
        self.identities = try NodeIdentities(paths: configuration.paths)
        if configuration.joinStateNamespace != nil {
            // From the first accepted connection: no node and no join until the ConfigMaps are listed
            // (``setJoinState``), and never the folder's tokens or records.
            if !identities.expectedNodes.isEmpty || AtomicFile.exists(configuration.paths.tokens) {
                logger.warning("\(configuration.paths.directory): tokens.json and nodes.json are ignored with --join-state-namespace")
            }
            identities.replace([], synced: false)
            joins.useTokens { [] }
        }
        let authority = try CertificateAuthority.load(from: configuration.caPaths)
        if configuration.stateDirectory != nil {
            try AtomicFile.makeDirectory(configuration.statePaths.directory, mode: 0o700)
        }
        let sans = try ServerSANs(ips: configuration.certIPs, dnsNames: configuration.certDNSNames)
        let serving = try ServingCertificate.ensure(
            paths: configuration.statePaths, sans: sans, authority: authority,
            validity: configuration.servingCertificateValidity, logger: logger)
        clientCA = try configuration.clientCAFile.map { try TLSContexts.trustRoots(file: $0) }
            ?? .certificates([try TLSContexts.nioCertificate(authority.certificate)])
        _authority = authority
        _serving = serving.certificate
        _sans = sans
        (_tunnelContext, _callerContext) = try Self.contexts(serving, authority: authority, clientCA: clientCA)
        metrics.certificateExpiry.set(serving.certificate.notValidAfter.timeIntervalSince1970)
        metrics.replicas.set(Int64(configuration.serverCount))
        kubeletClientContext = try Self.kubeletContext(configuration: configuration, authority: authority, logger: logger)
    }

    private static func kubeletContext(configuration: ServerConfiguration, authority: CertificateAuthority, logger: Logger)
        throws -> NIOSSLContext
    {
        let paths = configuration.statePaths
        let certificate: Certificate
        let key: Certificate.PrivateKey
        if let certPath = configuration.kubeletClientCert {
            guard let keyPath = configuration.kubeletClientKey else {
                throw PKIError(.invalidArgument, "--kubelet-client-cert needs --kubelet-client-key")
            }
            (certificate, key) = try PEMFiles.keyPair(certificate: certPath, key: keyPath)
        } else if let existing = try? PEMFiles.keyPair(
            certificate: paths.file("kubelet-client.crt"), key: paths.file("kubelet-client.key")),
            Date() < ServingCertificate.renewalTime(of: existing.0)
        {
            (certificate, key) = existing
        } else {
            let issued = try authority.issueClientCertificate(commonName: "edge-tunnel-kubelet-client")
            try issued.write(certificatePath: paths.file("kubelet-client.crt"), keyPath: paths.file("kubelet-client.key"))
            (certificate, key) = (issued.certificate, issued.privateKey)
        }
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.certificateChain = [.certificate(try TLSContexts.nioCertificate(certificate))]
        tls.privateKey = .privateKey(try TLSContexts.nioKey(key))
        if let caFile = configuration.kubeletCAFile {
            tls.trustRoots = try TLSContexts.trustRoots(file: caFile)
            // The kubelet is reached through a socket pair inside the stream, so there is no peer address to
            // match an IP SAN against: BoringSSL verifies the chain, `KubeletName` the name after the handshake.
            tls.certificateVerification = .noHostnameVerification
        } else {
            tls.certificateVerification = .none
            logger.warning("no --kubelet-ca-file: kubelets' serving certificates are not verified")
        }
        return try NIOSSLContext(configuration: tls)
    }

    private static func contexts(_ serving: IssuedCredential, authority: CertificateAuthority, clientCA: NIOSSLTrustRoots)
        throws -> (NIOSSLContext, NIOSSLContext)
    {
        let chain = [serving.certificate, authority.certificate]
        return (
            try TLSContexts.tunnelServer(chain: chain, key: serving.privateKey, ca: authority.certificate),
            try TLSContexts.callerServer(chain: chain, key: serving.privateKey, clientCA: clientCA)
        )
    }

    func authority() throws -> CertificateAuthority { lock.withLock { _authority } }
    var tunnelContext: NIOSSLContext { lock.withLock { _tunnelContext } }
    var callerContext: NIOSSLContext { lock.withLock { _callerContext } }
    var servingCertificate: Certificate { lock.withLock { _serving } }
    var sans: ServerSANs { lock.withLock { _sans } }

    /// Makes the serving certificate name exactly `sans` and be far from expiry: re-issues it from the CA when
    /// needed (same key type, new serial), writes it atomically, and serves it to every new handshake.
    /// Returns whether a new certificate was issued.
    @discardableResult
    func refreshServingCertificate(sans: ServerSANs) throws -> Bool {
        let (current, authority) = lock.withLock { (_serving, _authority) }
        let currentSANs = try? CertificateSummary.sans(of: current)
        if currentSANs == sans && Date() < ServingCertificate.renewalTime(of: current) {
            lock.withLock { _sans = sans }
            return false
        }
        let issued = try authority.issueServerCertificate(sans: sans, validity: configuration.servingCertificateValidity)
        let (tunnel, caller) = try Self.contexts(issued, authority: authority, clientCA: clientCA)
        try issued.write(certificatePath: configuration.statePaths.serverCertificate, keyPath: configuration.statePaths.serverKey)
        lock.withLock {
            _serving = issued.certificate
            _sans = sans
            _tunnelContext = tunnel
            _callerContext = caller
        }
        metrics.certificateExpiry.set(issued.certificate.notValidAfter.timeIntervalSince1970)
        logger.info("serving certificate re-issued; new handshakes get it, open connections keep theirs", metadata: [
            "sans": "\((sans.ipAddresses.map(\.description) + sans.dnsNames).joined(separator: ","))",
            "notAfter": "\(Timestamps.iso8601(issued.certificate.notValidAfter))",
        ])
        return true
    }
}

/// The serving certificate: reused while it matches the wanted SANs and is far from expiry, else re-issued.
enum ServingCertificate {
    static func ensure(
        paths: PKIPaths, sans wanted: ServerSANs, authority: CertificateAuthority, validity: TimeInterval, logger: Logger
    ) throws
        -> IssuedCredential
    {
        if AtomicFile.exists(paths.serverCertificate),
            let (certificate, key) = try? PEMFiles.keyPair(certificate: paths.serverCertificate, key: paths.serverKey),
            authority.certificate.publicKey.isValidSignature(certificate.signature, for: certificate),
            (try? CertificateSummary.sans(of: certificate)) == wanted,
            Date() < renewalTime(of: certificate)
        {
            logger.info("reusing serving certificate \(paths.serverCertificate)")
            return IssuedCredential(certificate: certificate, privateKey: key)
        }
        let issued = try authority.issueServerCertificate(sans: wanted, validity: validity)
        try issued.write(certificatePath: paths.serverCertificate, keyPath: paths.serverKey)
        logger.info("issued serving certificate", metadata: [
            "sans": "\((wanted.ipAddresses.map(\.description) + wanted.dnsNames).joined(separator: ","))",
        ])
        return issued
    }

    /// Two thirds into the certificate's life.
    static func renewalTime(of certificate: Certificate) -> Date {
        let life = certificate.notValidAfter.timeIntervalSince(certificate.notValidBefore)
        return certificate.notValidBefore.addingTimeInterval(life * 2 / 3)
    }
}

/// The EdgeTunnel server: agents' tunnels on the tunnel port, cloud callers' `CONNECT` on the secure port,
/// health, readiness, metrics and the agent list on the meta port.
public final class TunnelServer: @unchecked Sendable {
    public let configuration: ServerConfiguration
    let core: TunnelServerCore
    private let group: EventLoopGroup
    private let ownsGroup: Bool
    private let lock = NIOLock()
    private var channels: [Channel] = []
    /// Device and inode of the Unix socket file this server created (--uds-path).
    private var udsIdentity: (device: UInt, inode: UInt)?
    private var ready = false
    private let started = NIODeadline.now()
    private var renewalTask: Scheduled<Void>?
    private var identityWatch: RepeatedTask?
    /// One per listener: connections not yet authenticated (see ``ConnectionGate``).
    private var gates: [ConnectionGate] = []
    /// The certificate's addresses from the configuration, and from the Service (``setServiceAddresses``).
    private var configuredAddresses: (ips: [String], dnsNames: [String])
    private var serviceAddresses: (ips: [String], dnsNames: [String]) = ([], [])

    /// Loads the CA and prepares the serving certificate; throws a one-line error naming what is wrong.
    public init(configuration: ServerConfiguration, logger: Logger, group: EventLoopGroup? = nil) throws {
        self.configuration = configuration
        self.core = try TunnelServerCore(configuration: configuration, logger: logger)
        self.configuredAddresses = (configuration.certIPs, configuration.certDNSNames)
        if let group {
            self.group = group
            self.ownsGroup = false
        } else {
            self.group = MultiThreadedEventLoopGroup(numberOfThreads: configuration.eventLoopThreads)
            self.ownsGroup = true
        }
    }

    public var registry: AgentRegistry { core.registry }

    /// Applies a new address set (from a changed config file or SIGHUP): the certificate is re-issued when
    /// its SANs differ, without restarting and without touching open tunnels. Invalid addresses are refused
    /// with an error naming them, and the current certificate stays.
    public func updateAddresses(certIPs: [String], certDNSNames: [String]) throws {
        _ = try ServerSANs(ips: certIPs, dnsNames: certDNSNames)  // refuse a bad set before it is merged
        lock.withLock { configuredAddresses = (certIPs, certDNSNames) }
        try applyAddresses()
    }

    /// The addresses of the Service the server is reached through (``ServerConfiguration/addressService``),
    /// named by the certificate besides the configured ones; re-issued when they change, without a restart.
    public func setServiceAddresses(ips: [String], dnsNames: [String]) throws {
        lock.withLock { serviceAddresses = (ips, dnsNames) }
        try applyAddresses()
    }

    private func applyAddresses() throws {
        let (configured, service) = lock.withLock { (configuredAddresses, serviceAddresses) }
        func union(_ a: [String], _ b: [String]) -> [String] {
            var seen = Set<String>()
            return (a + b).filter { seen.insert($0).inserted }
        }
        let sans = try ServerSANs(ips: union(configured.ips, service.ips), dnsNames: union(configured.dnsNames, service.dnsNames))
        try core.refreshServingCertificate(sans: sans)
    }

    /// From now on an agent registers only as a Node of `directory` that exists, claiming only addresses its Node
    /// reports; the tunnels of Nodes that go away are closed (call ``nodeDeleted(_:)`` from the directory).
    public func useNodeObjects(_ directory: NodeDirectory) {
        core.setNodeDirectory(directory)
    }

    /// Keeps tokens and node records in Kubernetes objects instead of the PKI folder; until they are first
    /// listed, no node is accepted (a revocation must not be missed) and no join (no token is known).
    public func useJoinState(_ state: KubeJoinState) {
        core.setJoinState(state)
    }

    /// The tokens or node records changed (the watch): revoked and reset nodes' tunnels close as with the file.
    public func joinStateChanged() {
        core.refreshIdentities()
    }

    /// Node `name` was deleted: its tunnel closes.
    public func nodeDeleted(_ name: String) {
        for session in core.registry.liveSessions where session.nodeName == name {
            session.cutOff(reason: "the Node object of \(name) was deleted")
        }
    }

    /// A new number of server replicas (a reloaded `--server-count`, or the Leases): every agent is told.
    public func setServerCount(_ count: Int) {
        core.setServerCount(count)
    }

    /// Re-reads `nodes.json` every two seconds: a node revoked (or reset) by `edgetunnel node` loses its live
    /// tunnel within seconds.
    private func watchIdentities() {
        let core = self.core
        var seen = core.identities.generation
        let task = group.next().scheduleRepeatedTask(initialDelay: .seconds(2), delay: .seconds(2)) { _ in
            do {
                try core.identities.reloadIfChanged()
            } catch {
                core.logger.error("cannot read the node identities: \(error)")
                return
            }
            // A join or a renewal may have re-read the file first: every change is acted on here, once.
            let generation = core.identities.generation
            guard generation != seen else { return }
            seen = generation
            for session in core.registry.liveSessions
            where !core.identities.accepts(node: session.nodeName, certificateValidFrom: session.certificateValidFrom) {
                session.cutOff(reason: "node \(session.nodeName) is revoked or was reset: its certificate is no longer accepted")
            }
        }
        lock.withLock { identityWatch = task }
    }

    /// Re-issues the serving certificate two thirds into its life, checked at least hourly.
    private func scheduleRenewal() {
        let renewal = ServingCertificate.renewalTime(of: core.servingCertificate)
        let delay = min(max(renewal.timeIntervalSinceNow, 1), 3600)
        let task = group.next().scheduleTask(in: .milliseconds(Int64(delay * 1000))) { [weak self] in
            guard let self, self.lock.withLock({ self.ready }) else { return }
            do {
                try self.core.refreshServingCertificate(sans: self.core.sans)
            } catch {
                self.core.logger.error("cannot renew the serving certificate: \(error)")
            }
            self.scheduleRenewal()
        }
        lock.withLock { renewalTask = task }
    }

    /// The gate of the listener named `port`. On plain ports (`tls` false) the deadline is the request head's,
    /// and a little longer than it, so that the 408 goes out first.
    private func makeGate(_ port: String, tls: Bool = true) -> ConnectionGate {
        let metrics = core.metrics
        let logger = core.logger
        let gate = ConnectionGate(
            port: port, total: configuration.maxPendingConnections,
            perSource: configuration.maxPendingConnectionsPerSource,
            deadline: configuration.handshakeTimeout + (tls ? .zero : .seconds(2))
        ) { port, reason in
            metrics.connectionsRejected.increment(port, reason.rawValue)
            logger.debug("\(port) connection closed before it authenticated: \(reason.rawValue)")
        }
        lock.withLock { gates.append(gate) }
        return gate
    }

    /// Binds every listener (ports given as 0 are chosen by the OS).
    public func start() async throws {
        let host = configuration.bindAddress
        let core = self.core
        if configuration.insecurePort != 0 && !Self.isLoopback(configuration.insecureBindAddress) {
            guard configuration.allowInsecureBind else {
                throw PKIError(.invalidArgument,
                    "--insecure-bind-address \(configuration.insecureBindAddress) is not a loopback address: the insecure "
                    + "port proxies without authentication; pass --allow-insecure-bind to expose it, or --insecure-port 0")
            }
            core.logger.critical("""
                the insecure port \(configuration.insecurePort) proxies WITHOUT AUTHENTICATION on \
                \(configuration.insecureBindAddress) (--allow-insecure-bind): anyone who reaches it reaches every \
                node's allowed endpoints
                """)
        }
        // On the tunnel port a handshake without a certificate is a join: it stays counted (and under the
        // deadline) until it ends; an agent's certificate releases it (TunnelConnectionClassifier).
        let tunnelGate = makeGate("tunnel")
        let secureGate = makeGate("secure")
        let tunnel = try await ServerBootstrap(group: group)
            .streamListener(halfClosure: false)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(tunnelGate.handler())
                    try sync.addHandler(ReplicaProbeResponder(serverID: core.configuration.serverID, pace: core.replicaProbePace))
                    try sync.addHandler(NIOSSLServerHandler(context: core.tunnelContext))
                    try sync.addHandler(FrameDecoder(maxPayload: Frame.maxUnregisteredPayload))
                    try sync.addHandler(FrameEncoder())
                    try sync.addHandler(TunnelConnectionClassifier(server: core))
                    try sync.addHandler(CloseOnErrorHandler(logger: core.logger, what: "tunnel"))
                }
            }
            .bind(host: host, port: configuration.tunnelPort).get()
        let secure = try await ServerBootstrap(group: group)
            .streamListener()
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(secureGate.handler())
                    try sync.addHandler(NIOSSLServerHandler(context: core.callerContext))
                    try sync.addHandler(HostRouter(server: core, mode: .tls))
                }
            }
            .bind(host: host, port: configuration.securePort).get()
        let meta = try await MetaHTTPServer.bind(host: host, port: configuration.metaPort, group: group) {
            [weak self] method, path in
            self?.route(method, path) ?? .text(.serviceUnavailable, "shutting down")
        }
        var insecure: Channel?
        if configuration.insecurePort != 0 {
            let gate = makeGate("insecure", tls: false)
            insecure = try await ServerBootstrap(group: group)
                .streamListener()
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(gate.handler())
                        try channel.pipeline.syncOperations.addHandler(HostRouter(server: core, mode: .plain))
                    }
                }
                .bind(host: configuration.insecureBindAddress, port: configuration.insecurePort).get()
        }
        var uds: Channel?
        if let path = configuration.udsPath {
            uds = try await bindUnixSocket(path: path)
        }
        lock.withLock {
            channels = [tunnel, secure, meta] + (insecure.map { [$0] } ?? []) + (uds.map { [$0] } ?? [])
            ready = true
        }
        scheduleRenewal()
        watchIdentities()
        core.logger.info("edge-tunnel-server listening", metadata: [
            "tunnel": "\(tunnel.localAddress?.description ?? "?")",
            "secure": "\(secure.localAddress?.description ?? "?")",
            "meta": "\(meta.localAddress?.description ?? "?")",
        ])
    }

    /// Listens on a Unix socket readable and writable by the owner only; a stale socket file is replaced.
    ///
    /// The socket is created and bound here and handed to NIO bound: NIO removes the file of a socket it bound
    /// itself when the channel closes, whoever's file it is by then (see ``removeOwnUnixSocket(path:)``).
    private func bindUnixSocket(path: String) async throws -> Channel {
        var info = stat()
        if lstat(path, &info) == 0 {
            guard (info.st_mode & S_IFMT) == S_IFSOCK else {
                throw PKIError(.invalidArgument, "--uds-path \(path) exists and is not a socket")
            }
            unlink(path)
        }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw PKIError(.invalidArgument, "--uds-path \(path) is longer than a Unix socket path may be")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw PKIError(.invalidArgument, "--uds-path \(path): cannot create a socket (errno \(errno))") }
        // Created under a restrictive umask so that it is never reachable by others.
        let previous = umask(0o177)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        let bindError = errno
        umask(previous)
        guard bound == 0, listen(fd, 1024) == 0 else {
            close(fd)
            throw PKIError(.invalidArgument, "--uds-path \(path): cannot listen (\(String(cString: strerror(bindError))))")
        }
        chmod(path, 0o600)
        var created = stat()
        if lstat(path, &created) == 0 {
            lock.withLock { udsIdentity = (UInt(created.st_dev), UInt(created.st_ino)) }
        }
        let core = self.core
        let gate = makeGate("uds", tls: false)
        return try await ServerBootstrap(group: group)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelOption(.recvAllocator, value: SocketTuning.receiveAllocator)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(gate.handler())
                    try channel.pipeline.syncOperations.addHandler(HostRouter(server: core, mode: .plain))
                }
            }
            .withBoundSocket(fd).get()
    }

    static func isLoopback(_ address: String) -> Bool {
        guard let ip = IPAddress(address) else { return address == "localhost" }
        return ip.isLoopback
    }

    /// Removes the Unix socket file if it is still ours: during a rolling restart on a shared path the next
    /// server may already have replaced it, and removing that one would cut off every co-located caller.
    private func removeOwnUnixSocket(path: String) {
        guard let identity = lock.withLock({ udsIdentity }) else { return }
        var info = stat()
        guard lstat(path, &info) == 0, UInt(info.st_dev) == identity.device, UInt(info.st_ino) == identity.inode else { return }
        unlink(path)
    }

    /// Graceful shutdown: stop accepting, tell every agent to send no new streams (GOAWAY), let open streams
    /// finish for up to the drain timeout, then close everything.
    public func shutdown() async {
        let listeners = lock.withLock {
            ready = false
            renewalTask?.cancel()
            identityWatch?.cancel()
            let all = channels
            channels = []
            return all
        }
        for channel in listeners { try? await channel.close() }
        if let path = configuration.udsPath { removeOwnUnixSocket(path: path) }
        let sessions = core.registry.sessions
        for session in sessions { session.mux.drain(reason: "server shutting down") }
        let loop = group.next()
        await EventLoopFuture.andAllComplete(sessions.map { $0.mux.whenIdle() }, on: loop)
            .orTimeout(configuration.drainTimeout)
        for session in sessions { try? await session.channel.close() }
        if ownsGroup { try? await group.shutdownGracefully() }
    }

    /// With several replicas a caller routed here must find its node here: until every joined node holds a
    /// tunnel to this replica (or ``ServerConfiguration/replicaWarmup`` has passed) it is not ready, so the
    /// callers' Service does not send it requests it would answer with 502. The agents' Service must include
    /// unready replicas (`publishNotReadyAddresses`), or they could never attach.
    private func replicaWarmingUp() -> String? {
        guard core.serverCount > 1, NIODeadline.now() - started < configuration.replicaWarmup else { return nil }
        let expected = core.identities.expectedNodes
        guard !expected.isEmpty else { return nil }
        let missing = expected.subtracting(core.registry.sessions.map(\.nodeName))
        guard let example = missing.min() else { return nil }
        return "warming up: \(expected.count - missing.count) of \(expected.count) joined nodes hold a tunnel to this "
            + "replica (missing: \(example)\(missing.count > 1 ? " and \(missing.count - 1) more" : ""))"
    }

    private func route(_ method: HTTPMethod, _ path: String) -> MetaResponse {
        switch path {
        case "/healthz", "/livez":
            return .text(.ok, "ok")
        case "/readyz", "/readyz/listeners":
            let isReady = lock.withLock { ready }
            guard isReady else { return .text(.serviceUnavailable, "listeners are not up") }
            // A replica that cannot list the join state (RBAC, the API down) accepts no agent: a rollout with
            // broken access stops at its first pod.
            guard core.identities.isLoaded else {
                return .text(.serviceUnavailable, "the join state (tokens, node records) has not been listed yet")
            }
            // `/readyz/listeners` is for a Service that agents use too: agents must reach an unready replica.
            if path == "/readyz", let missing = replicaWarmingUp() { return .text(.serviceUnavailable, missing) }
            return .text(.ok, "ok")
        case "/metrics":
            return MetaResponse(
                status: .ok, contentType: "text/plain; version=0.0.4; charset=utf-8",
                body: core.metrics.render(
                    registry: core.registry, gates: lock.withLock { gates }, budget: core.limits.processBudget))
        case "/v1/agents":
            return MetaResponse(status: .ok, contentType: "application/json", body: agentsJSON())
        case "/v1/server":
            return MetaResponse(status: .ok, contentType: "application/json", body: serverJSON())
        default:
            return .text(.notFound, "no such endpoint: \(path)")
        }
    }

    /// What `/v1/agents` serves.
    public struct AgentInfo: Codable, Sendable {
        public var nodeName: String
        public var nodeIPs: [String]
        public var connectedSince: Date
        public var remoteAddress: String
        public var streams: Int
        public var bytesFromAgent: Int
        public var bytesToAgent: Int
    }

    public var agents: [AgentInfo] {
        core.registry.sessions.map { session in
            let counters = session.mux.counters.snapshot
            return AgentInfo(
                nodeName: session.nodeName, nodeIPs: session.nodeIPs, connectedSince: session.connectedSince,
                remoteAddress: session.remoteAddress, streams: counters.streams, bytesFromAgent: counters.bytesIn,
                bytesToAgent: counters.bytesOut)
        }.sorted { $0.nodeName < $1.nodeName }
    }

    /// What `/v1/server` serves: the certificate in force and the addresses it names.
    public struct ServerInfo: Codable, Sendable {
        public var serverID: String
        public var certificateIPs: [String]
        public var certificateDNSNames: [String]
        public var certificateSerial: String
        public var certificateNotAfter: Date
        public var agents: Int
    }

    public var serverInfo: ServerInfo {
        let certificate = core.servingCertificate
        let summary = try? CertificateSummary(certificate)
        return ServerInfo(
            serverID: configuration.serverID, certificateIPs: summary?.ipAddresses ?? [],
            certificateDNSNames: summary?.dnsNames ?? [], certificateSerial: summary?.serialNumber ?? "",
            certificateNotAfter: certificate.notValidAfter, agents: core.registry.count)
    }

    private func serverJSON() -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.sortedKeys]
        return Array((try? encoder.encode(serverInfo)) ?? Data())
    }

    private func agentsJSON() -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.sortedKeys]
        struct Body: Encodable {
            var serverID: String
            var agents: [AgentInfo]
        }
        return Array((try? encoder.encode(Body(serverID: configuration.serverID, agents: agents))) ?? Data())
    }
}
