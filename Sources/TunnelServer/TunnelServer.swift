import Foundation
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

#if canImport(Glibc)
import Glibc
#endif

/// The EdgeTunnel server: agents' tunnels on the tunnel port, cloud callers' `CONNECT` on the secure port,
/// health, readiness, metrics and the agent list on the meta port.
public final class TunnelServer: @unchecked Sendable {
    public let configuration: ServerConfiguration
    let core: TunnelServerCore
    /// The event loops of every listener, tunnel and Kubernetes API connection of this server.
    public let group: EventLoopGroup
    private let ownsGroup: Bool
    let lock = NIOLock()
    private var channels: [Channel] = []
    /// The gRPC frontend, when `--grpc-uds-path` is set.
    private var grpc: GRPCListener?
    /// Device and inode of each Unix socket file this server created (--uds-path, --grpc-uds-path), by path.
    var socketIdentities: [String: (device: UInt, inode: UInt)] = [:]
    var ready = false
    let started = NIODeadline.now()
    private var renewalTask: Scheduled<Void>?
    private var identityWatch: RepeatedTask?
    /// One per listener: connections not yet authenticated (see ``ConnectionGate``).
    var gates: [ConnectionGate] = []
    /// The certificate's addresses from the configuration, and from the Service (``setServiceAddresses``).
    private var configuredAddresses: (ips: [String], dnsNames: [String])
    private var serviceAddresses: [String: (ips: [String], dnsNames: [String])] = [:]
    /// Services whose last update was refused, and why: the readiness check says so.
    private var refusedAddressServices: [String: String] = [:]
    /// Held from reading the addresses to installing the certificate made from them: each Service's watch, the
    /// config reloader and the renewal update at the same time, and a certificate made from an older read must
    /// not replace a newer one (it dropped a Service's addresses until its next change).
    private let certificateUpdates = NIOLock()
    /// Tests only: runs after the addresses were read for a new certificate, before it is made.
    var afterAddressesRead: (@Sendable () -> Void)?

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

    /// The addresses of `service`, one of the Services the server is reached through
    /// (``ServerConfiguration/addressServices``), named by the certificate besides the configured ones and those
    /// of the other Services; re-issued when they change, without a restart. Returns what the certificate takes.
    ///
    /// Every entry is checked before anything is kept (``ServiceAddresses/check(ips:dnsNames:)``), so that what
    /// is kept always makes a certificate, and a later update of this Service, another Service's or the config
    /// file's always goes through:
    /// - an entry that is neither an IP address nor a DNS name (a wildcard among them) is left out, named in one
    ///   log line, and the rest is taken: one bad entry must not keep the certificate from following the others;
    /// - more than ``ServiceAddresses/maxAddresses`` addresses refuse the whole update with an error naming the
    ///   Service and the count: the certificate in force, and this Service's last addresses taken, stay.
    @discardableResult
    public func setServiceAddresses(
        _ service: String, ips: [String], dnsNames: [String]
    ) throws -> ServiceAddresses.Checked {
        let checked = ServiceAddresses.check(ips: ips, dnsNames: dnsNames)
        if !checked.invalid.isEmpty {
            let shown = checked.invalid.prefix(10).map { "\"\(PeerText.bounded($0, limit: 64))\"" }
            let more = checked.invalid.count > shown.count ? " and \(checked.invalid.count - shown.count) more" : ""
            let what = "neither an IP address nor a DNS name (wildcards are not taken)"
            core.logger.warning(
                "Service \(service): left out of the serving certificate, \(what): \(shown.joined(separator: ", "))\(more)"
            )
        }
        guard checked.count <= ServiceAddresses.maxAddresses else {
            let refusal = TooManyServiceAddresses(service: service, count: checked.count)
            lock.withLock { refusedAddressServices[service] = refusal.description }
            throw refusal
        }
        lock.withLock {
            serviceAddresses[service] = (checked.ips, checked.dnsNames)
            refusedAddressServices[service] = nil
        }
        try applyAddresses()
        return checked
    }

    /// A Service whose addresses the certificate does not take: more than ``ServiceAddresses/maxAddresses``.
    public struct TooManyServiceAddresses: Error, CustomStringConvertible, Sendable {
        public let service: String
        public let count: Int
        public var description: String {
            "Service \(service) has \(count) addresses, more than the \(ServiceAddresses.maxAddresses) a serving certificate "
                + "takes from one Service: keeping the current certificate"
        }
    }

    /// A Service of ``ServerConfiguration/addressServices`` whose addresses are not known yet: until they are,
    /// the certificate may not name the address a caller dials.
    var unlistedAddressService: String? {
        lock.withLock { configuration.addressServices.first { serviceAddresses[$0] == nil } }
    }

    /// Why the last update of `service`'s addresses was refused, if it was (``TooManyServiceAddresses``).
    func addressServiceRefusal(_ service: String) -> String? {
        lock.withLock { refusedAddressServices[service] }
    }

    private func applyAddresses() throws {
        try certificateUpdates.withLock { try applyAddressesLocked() }
    }

    private func applyAddressesLocked() throws {
        let (configured, services, hook) = lock.withLock { (configuredAddresses, serviceAddresses, afterAddressesRead) }
        hook?()
        let named = services.keys.sorted().compactMap { services[$0] }
        func union(_ a: [String], _ b: [String]) -> [String] {
            var seen = Set<String>()
            return (a + b).filter { seen.insert($0).inserted }
        }
        let sans = try ServerSANs(
            ips: union(configured.ips, named.flatMap(\.ips)),
            dnsNames: union(configured.dnsNames, named.flatMap(\.dnsNames)))
        try core.refreshServingCertificate(sans: sans)
    }

    /// From now on an agent registers only as a Node of `directory` that exists, claiming only addresses its Node
    /// reports, and an address leads to it only while its Node reports it; the tunnels of Nodes that go away are
    /// closed. Call ``nodeDeleted(_:)`` and ``nodeAddressesChanged(_:)`` from the directory.
    public func useNodeObjects(_ directory: NodeDirectory) {
        core.registry.checkIPs { directory.addresses(of: $0) }
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

    /// The addresses of these Nodes changed: an IP a Node no longer reports (removed, or given to another Node)
    /// stops leading to that node's tunnel at once; the tunnel stays, reached by the node's name.
    public func nodeAddressesChanged(_ names: [String]) {
        for name in names {
            let dropped = core.registry.recheckIPs(of: name)
            if !dropped.isEmpty {
                core.logger.warning(
                    "Node \(name) no longer reports \(dropped.joined(separator: ", ")): no longer routed to its tunnel",
                    metadata: ["node": "\(name)"])
            }
        }
    }

    /// Node `name` was deleted: its addresses stop leading to its tunnel at once, and the tunnel closes.
    public func nodeDeleted(_ name: String) {
        core.registry.recheckIPs(of: name)
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
                session.cutOff(
                    reason: "node \(session.nodeName) is revoked or was reset: its certificate is no longer accepted")
            }
        }
        lock.withLock { identityWatch = task }
    }

    /// Re-issues the serving certificate two thirds into its life, checked at least hourly.
    private func scheduleRenewal() {
        let renewal = core.servingCertificate.renewalTime
        let delay = min(max(renewal.timeIntervalSinceNow, 1), 3600)
        let task = group.next().scheduleTask(in: .milliseconds(Int64(delay * 1000))) { [weak self] in
            guard let self, self.lock.withLock({ self.ready }) else { return }
            do {
                try self.certificateUpdates.withLock {
                    _ = try self.core.refreshServingCertificate(sans: self.core.sans)
                }
            } catch {
                self.core.logger.error("cannot renew the serving certificate: \(error)")
            }
            self.scheduleRenewal()
        }
        lock.withLock { renewalTask = task }
    }

    /// The gate of the listener named `port`. On plain ports (`tls` false) the deadline is the request head's,
    /// and a little longer than it, so that the 408 goes out first. TLS listeners get overload control: the
    /// limit falls when even the quickest of a second's handshakes takes a fifth of the deadline, at least 1 s
    /// (2 s by default; an agent waits 6 s for its tunnel), so what is admitted can still finish.
    func makeGate(_ port: String, tls: Bool = true) -> ConnectionGate {
        let metrics = core.metrics
        let logger = core.logger
        let overload = TimeAmount.nanoseconds(max(1_000_000_000, configuration.handshakeTimeout.nanoseconds / 5))
        let gate = ConnectionGate(
            port: port, total: configuration.maxPendingConnections,
            perSource: configuration.maxPendingConnectionsPerSource,
            deadline: configuration.handshakeTimeout + (tls ? .zero : .seconds(2)),
            overloadTarget: tls ? overload : nil,
            onAuthenticated: { port in metrics.connectionsAuthenticated.increment(port) },
            onReject: { port, reason in
                metrics.connectionsRejected.increment(port, reason.rawValue)
                logger.debug("\(port) connection closed before it authenticated: \(reason.rawValue)")
            })
        lock.withLock { gates.append(gate) }
        return gate
    }

    /// Binds every listener (ports given as 0 are chosen by the OS).
    public func start() async throws {
        let host = configuration.bindAddress
        let core = self.core
        if configuration.insecurePort != 0 && !Self.isLoopback(configuration.insecureBindAddress) {
            guard configuration.allowInsecureBind else {
                throw ConfigurationError(
                    "--insecure-bind-address \(configuration.insecureBindAddress) is not a loopback address: the insecure "
                        + "port proxies without authentication; pass --allow-insecure-bind to expose it, or --insecure-port 0"
                )
            }
            core.logger.critical(
                """
                the insecure port \(configuration.insecurePort) proxies WITHOUT AUTHENTICATION on \
                \(configuration.insecureBindAddress) (--allow-insecure-bind): anyone who reaches it reaches every \
                node's allowed endpoints
                """)
        }
        // On the tunnel port a handshake without a certificate is a join: it stays counted (and under the
        // deadline) until it ends; an agent's certificate releases it (TunnelConnectionClassifier).
        let tunnelGate = makeGate("tunnel")
        let probePace: @Sendable () -> TimeAmount = {
            core.metrics.replicaProbes.increment()
            return core.replicaProbePace()
        }
        let secureGate = makeGate("secure")
        let tunnel = try await ServerBootstrap(group: group)
            .streamListener(halfClosure: false, oneStream: false)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(tunnelGate.handler())
                    try sync.addHandler(ReplicaProbeResponder(serverID: core.configuration.serverID, pace: probePace))
                    try sync.addHandler(NIOSSLServerHandler(context: core.tunnelContext))
                    try sync.addHandler(FrameDecoder(maxPayload: Frame.maxUnregisteredPayload))
                    try sync.addHandler(FrameEncoder())
                    try sync.addHandler(TunnelConnectionClassifier(server: core))
                    try sync.addHandler(
                        CloseOnErrorHandler(logger: core.logger, what: "tunnel", limitHits: core.metrics.limitHits))
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
        let meta = try await MetaHTTPServer.bind(
            host: host, port: configuration.metaPort, group: group, gate: makeGate("meta", tls: false)
        ) {
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
        var grpc: GRPCListener?
        if let path = configuration.grpcUdsPath { grpc = try await startGRPC(path: path) }
        lock.withLock {
            channels = [tunnel, secure, meta] + (insecure.map { [$0] } ?? []) + (uds.map { [$0] } ?? [])
            self.grpc = grpc
            ready = true
        }
        scheduleRenewal()
        watchIdentities()
        core.logger.info(
            "edge-tunnel-server listening",
            metadata: [
                "tunnel": "\(tunnel.localAddress?.description ?? "?")",
                "secure": "\(secure.localAddress?.description ?? "?")",
                "meta": "\(meta.localAddress?.description ?? "?")",
            ])
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
        let grpc = lock.withLock { self.grpc }
        // gRPC clients are told (DRAIN), and the listener closes; their open connectIDs go on through the drain.
        grpc?.frontend.stop()
        grpc?.server.beginGracefulShutdown()
        grpc?.frontend.drain()
        for channel in listeners { try? await channel.close() }
        if let path = configuration.udsPath { removeOwnUnixSocket(path: path) }
        if let path = configuration.grpcUdsPath { removeOwnUnixSocket(path: path) }
        let sessions = core.registry.sessions
        for session in sessions {
            session.mux.closeWithoutResume()  // what outlives the drain ends with the server
            session.mux.drain(reason: "server shutting down")
        }
        // Streams waiting for their agent to come back cannot be resumed by another process: they end now.
        for session in core.registry.liveSessions { session.abandonSuspended() }
        let loop = group.next()
        await EventLoopFuture.andAllComplete(sessions.map { $0.mux.whenIdle() }, on: loop)
            .orTimeout(configuration.drainTimeout)
        for session in sessions { try? await session.channel.close() }
        if let grpc {
            // Whatever the drain left is reset with its tunnel; the RPCs still open end with the server.
            grpc.frontend.endAll()
            grpc.serving.cancel()
            _ = try? await grpc.serving.value
        }
        // A closed tunnel resets its callers' sockets in tasks it queues on their loops. They run before the group
        // shuts down, which closes whatever is left with an orderly FIN: a caller cut short must see a reset, not
        // an end that a short transfer could pass for complete.
        for _ in 0..<3 {
            for loop in group.makeIterator() { try? await loop.submit {}.get() }
        }
        if ownsGroup { try? await group.shutdownGracefully() }
    }
}
