import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import TunnelPKI
import TunnelWire
import X509

/// State shared by every listener of one server.
final class TunnelServerCore: @unchecked Sendable {
    let configuration: ServerConfiguration
    let logger: Logger
    let registry = AgentRegistry()
    let metrics = ServerMetrics()
    let limits = TunnelLimits()
    let tokens: TokenStore
    private let lock = NIOLock()
    private var _authority: CertificateAuthority
    private var _tunnelContext: NIOSSLContext
    private var _callerContext: NIOSSLContext
    private var _serving: Certificate

    init(configuration: ServerConfiguration, logger: Logger) throws {
        self.configuration = configuration
        self.logger = logger
        self.tokens = TokenStore(paths: configuration.paths)
        let authority = try CertificateAuthority.load(from: configuration.paths)
        let serving = try ServingCertificate.ensure(configuration: configuration, authority: authority, logger: logger)
        let clientCA: NIOSSLTrustRoots = try configuration.clientCAFile.map { try TLSContexts.trustRoots(file: $0) }
            ?? .certificates([try TLSContexts.nioCertificate(authority.certificate)])
        let chain = [serving.certificate, authority.certificate]
        _authority = authority
        _serving = serving.certificate
        _tunnelContext = try TLSContexts.tunnelServer(chain: chain, key: serving.privateKey, ca: authority.certificate)
        _callerContext = try TLSContexts.callerServer(chain: chain, key: serving.privateKey, clientCA: clientCA)
        metrics.certificateExpiry.set(serving.certificate.notValidAfter.timeIntervalSince1970)
    }

    func authority() throws -> CertificateAuthority { lock.withLock { _authority } }
    var tunnelContext: NIOSSLContext { lock.withLock { _tunnelContext } }
    var callerContext: NIOSSLContext { lock.withLock { _callerContext } }
    var servingCertificate: Certificate { lock.withLock { _serving } }
}

/// The serving certificate: reused while it matches the wanted SANs and is far from expiry, else re-issued.
enum ServingCertificate {
    static func ensure(configuration: ServerConfiguration, authority: CertificateAuthority, logger: Logger) throws
        -> IssuedCredential
    {
        let paths = configuration.paths
        let wanted = try ServerSANs(ips: configuration.certIPs, dnsNames: configuration.certDNSNames)
        if AtomicFile.exists(paths.serverCertificate),
            let (certificate, key) = try? PEMFiles.keyPair(certificate: paths.serverCertificate, key: paths.serverKey),
            authority.certificate.publicKey.isValidSignature(certificate.signature, for: certificate),
            (try? CertificateSummary.sans(of: certificate)) == wanted,
            Date() < renewalTime(of: certificate)
        {
            logger.info("reusing serving certificate \(paths.serverCertificate)")
            return IssuedCredential(certificate: certificate, privateKey: key)
        }
        let issued = try authority.issueServerCertificate(sans: wanted)
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
    private var ready = false

    /// Loads the CA and prepares the serving certificate; throws a one-line error naming what is wrong.
    public init(configuration: ServerConfiguration, logger: Logger, group: EventLoopGroup? = nil) throws {
        self.configuration = configuration
        self.core = try TunnelServerCore(configuration: configuration, logger: logger)
        if let group {
            self.group = group
            self.ownsGroup = false
        } else {
            self.group = MultiThreadedEventLoopGroup(numberOfThreads: configuration.eventLoopThreads)
            self.ownsGroup = true
        }
    }

    public var registry: AgentRegistry { core.registry }

    /// Binds every listener. Ports given as 0 are chosen by the OS (see ``boundPorts``).
    public func start() async throws {
        let host = configuration.bindAddress
        let core = self.core
        let tunnel = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(NIOSSLServerHandler(context: core.tunnelContext))
                    try sync.addHandler(ByteToMessageHandler(FrameDecoder()))
                    try sync.addHandler(FrameEncoder())
                    try sync.addHandler(TunnelConnectionClassifier(server: core))
                    try sync.addHandler(CloseOnErrorHandler(logger: core.logger, what: "tunnel"))
                }
            }
            .bind(host: host, port: configuration.tunnelPort).get()
        let secure = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(NIOSSLServerHandler(context: core.callerContext))
                    try sync.addHandler(
                        ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .forwardBytes)))
                    try sync.addHandler(ConnectHandler(server: core, requireNonAgentCertificate: true))
                }
            }
            .bind(host: host, port: configuration.securePort).get()
        let meta = try await MetaHTTPServer.bind(host: host, port: configuration.metaPort, group: group) {
            [weak self] method, path in
            self?.route(method, path) ?? .text(.serviceUnavailable, "shutting down")
        }
        lock.withLock {
            channels = [tunnel, secure, meta]
            ready = true
        }
        core.logger.info("edge-tunnel-server listening", metadata: [
            "tunnel": "\(tunnel.localAddress?.description ?? "?")",
            "secure": "\(secure.localAddress?.description ?? "?")",
            "meta": "\(meta.localAddress?.description ?? "?")",
        ])
    }

    /// The ports actually bound: tunnel, secure, meta.
    public var boundPorts: (tunnel: Int, secure: Int, meta: Int) {
        let ports = lock.withLock { channels.map { $0.localAddress?.port ?? 0 } }
        guard ports.count == 3 else { return (0, 0, 0) }
        return (ports[0], ports[1], ports[2])
    }

    /// Graceful shutdown: stop accepting, tell every agent to send no new streams (GOAWAY), let open streams
    /// finish for up to the drain timeout, then close everything.
    public func shutdown() async {
        let listeners = lock.withLock {
            ready = false
            let all = channels
            channels = []
            return all
        }
        for channel in listeners { try? await channel.close() }
        let sessions = core.registry.sessions
        for session in sessions { session.mux.drain(reason: "server shutting down") }
        let deadline = NIODeadline.now() + configuration.drainTimeout
        while NIODeadline.now() < deadline, sessions.contains(where: { $0.streamCount > 0 }) {
            try? await Task.sleep(for: .milliseconds(100))
        }
        for session in sessions { try? await session.channel.close() }
        if ownsGroup { try? await group.shutdownGracefully() }
    }

    private func route(_ method: HTTPMethod, _ path: String) -> MetaResponse {
        switch path {
        case "/healthz", "/livez":
            return .text(.ok, "ok")
        case "/readyz":
            let isReady = lock.withLock { ready }
            return isReady ? .text(.ok, "ok") : .text(.serviceUnavailable, "listeners are not up")
        case "/metrics":
            return MetaResponse(
                status: .ok, contentType: "text/plain; version=0.0.4; charset=utf-8",
                body: core.metrics.render(registry: core.registry))
        case "/v1/agents":
            return MetaResponse(status: .ok, contentType: "application/json", body: agentsJSON())
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
