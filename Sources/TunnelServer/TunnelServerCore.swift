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

/// State shared by every listener of one server.
///
/// The TLS contexts are swapped as a whole when the serving certificate changes: every new handshake reads
/// the current context when its connection is accepted, connections already open keep theirs.
final class TunnelServerCore: @unchecked Sendable {
    let configuration: ServerConfiguration
    let logger: Logger
    let registry = AgentRegistry()
    let probePacer: ReplicaProbePacer
    let renewals = RenewalGuard()
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

    /// Takes the node records the join state holds now (after the watch or this replica's own join changed them),
    /// and which nodes' record objects do not parse (they count as revoked).
    func refreshIdentities() {
        guard let state = joinState else { return }
        identities.replace(state.knownRecords, synced: state.isSynced, unreadable: { state.hasUnreadableRecord($0) })
    }

    /// The cluster's Node objects when the server checks agents against them (``TunnelServer/useNodeObjects``).
    var nodeDirectory: NodeDirectory? { lock.withLock { _nodeDirectory } }
    func setNodeDirectory(_ directory: NodeDirectory) { lock.withLock { _nodeDirectory = directory } }

    /// How many server replicas there are (``ServerConfiguration/serverCount``, or the Leases): every agent keeps
    /// a tunnel to each.
    var serverCount: Int { lock.withLock { _serverCount } }

    /// How long an agent that probed this replica but already holds it waits before its next probe
    /// (``ReplicaProbe``): the pacer follows the probes received (``ReplicaProbePacer``), under a ceiling that
    /// holds even if every agent held here were looking. Every agent missing a replica probes at about this pace,
    /// and the Service spreads the probes over the replicas: the agents held here over
    /// (``ServerConfiguration/replicaProbeRate`` × replicas) keeps each replica near that rate.
    func replicaProbePace() -> TimeAmount {
        let seconds = Double(registry.count) / (probePacer.target * Double(max(1, serverCount)))
        let ceiling = TimeAmount.milliseconds(Int64(min(seconds, 300) * 1000))
        return probePacer.pace(ceiling: ceiling)
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
        self.probePacer = ReplicaProbePacer(target: configuration.replicaProbeRate)
        self._serverCount = configuration.serverCount
        self.joins = JoinGuard(store: TokenStore(paths: configuration.paths))
        var limits = TunnelLimits()
        limits.maxStreams = configuration.maxStreamsPerAgent
        limits.maxPendingOpens = configuration.maxPendingOpensPerAgent
        limits.openTimeout = configuration.dialTimeout
        limits.processBudget = WindowBudget(limit: configuration.maxBufferedBytes)
        // What resumable tunnels keep to send again, together: as much again as the receive windows may hold.
        limits.processRetained = RetainedBudget(limit: configuration.maxBufferedBytes)
        self.limits = limits
        self.callerStreams = CallerStreams(limit: configuration.maxStreamsPerCaller)
        self.identities = try NodeIdentities(paths: configuration.paths)
        if configuration.joinStateNamespace != nil {
            // From the first accepted connection: no node and no join until the ConfigMaps are listed
            // (``setJoinState``), and never the folder's tokens or records.
            if !identities.expectedNodes.isEmpty || AtomicFile.exists(configuration.paths.tokens) {
                logger.warning(
                    "\(configuration.paths.directory): tokens.json and nodes.json are ignored with --join-state-namespace"
                )
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
        clientCA =
            try configuration.clientCAFile.map { try TLSContexts.trustRoots(file: $0) }
            ?? .certificates([try TLSContexts.nioCertificate(authority.certificate)])
        _authority = authority
        _serving = serving.certificate
        _sans = sans
        (_tunnelContext, _callerContext) = try Self.contexts(serving, authority: authority, clientCA: clientCA)
        metrics.certificateExpiry.set(serving.certificate.notValidAfter.timeIntervalSince1970)
        metrics.replicas.set(Int64(configuration.serverCount))
        kubeletClientContext = try Self.kubeletContext(
            configuration: configuration, authority: authority, logger: logger)
    }

    private static func kubeletContext(
        configuration: ServerConfiguration, authority: CertificateAuthority, logger: Logger
    )
        throws -> NIOSSLContext
    {
        let paths = configuration.statePaths
        let certificate: Certificate
        let key: Certificate.PrivateKey
        if let certPath = configuration.kubeletClientCert {
            guard let keyPath = configuration.kubeletClientKey else {
                throw ConfigurationError("--kubelet-client-cert needs --kubelet-client-key")
            }
            (certificate, key) = try PEMFiles.keyPair(certificate: certPath, key: keyPath)
        } else if let existing = try? PEMFiles.keyPair(
            certificate: paths.file("kubelet-client.crt"), key: paths.file("kubelet-client.key")),
            Date() < existing.0.renewalTime
        {
            (certificate, key) = existing
        } else {
            let issued = try authority.issueClientCertificate(commonName: "edge-tunnel-kubelet-client")
            try issued.write(
                certificatePath: paths.file("kubelet-client.crt"), keyPath: paths.file("kubelet-client.key"))
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

    private static func contexts(
        _ serving: IssuedCredential, authority: CertificateAuthority, clientCA: NIOSSLTrustRoots
    )
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
        if currentSANs == sans && Date() < current.renewalTime {
            lock.withLock { _sans = sans }
            return false
        }
        let issued = try authority.issueServerCertificate(
            sans: sans, validity: configuration.servingCertificateValidity)
        let (tunnel, caller) = try Self.contexts(issued, authority: authority, clientCA: clientCA)
        try issued.write(
            certificatePath: configuration.statePaths.serverCertificate, keyPath: configuration.statePaths.serverKey)
        lock.withLock {
            _serving = issued.certificate
            _sans = sans
            _tunnelContext = tunnel
            _callerContext = caller
        }
        metrics.certificateExpiry.set(issued.certificate.notValidAfter.timeIntervalSince1970)
        logger.info(
            "serving certificate re-issued; new handshakes get it, open connections keep theirs",
            metadata: [
                "sans": "\((sans.ipAddresses.map(\.description) + sans.dnsNames).joined(separator: ","))",
                "notAfter": "\(Timestamps.iso8601(issued.certificate.notValidAfter))",
            ])
        return true
    }
}
