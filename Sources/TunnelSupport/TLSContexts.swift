import NIOCore
import NIOSSL
import TunnelPKI
import X509

/// NIOSSL contexts built from our PEM files, with errors that name the file.
public enum TLSContexts {
    /// Converts swift-certificates values to NIOSSL's.
    public static func nioCertificate(_ certificate: Certificate) throws -> NIOSSLCertificate {
        try NIOSSLCertificate(bytes: PEMFiles.der(certificate), format: .der)
    }

    public static func nioKey(_ key: Certificate.PrivateKey) throws -> NIOSSLPrivateKey {
        try NIOSSLPrivateKey(bytes: Array(PEMFiles.pem(key).utf8), format: .pem)
    }

    /// Reads every certificate of a PEM bundle for a trust store.
    public static func trustRoots(file: String) throws -> NIOSSLTrustRoots {
        let certificates = try PEMFiles.certificates(at: file)
        return .certificates(try certificates.map(nioCertificate))
    }

    /// The tunnel port (10262): TLS 1.3 only; a client certificate is optional (a joining agent has none) but,
    /// when presented, must chain to the tunnel CA.
    public static func tunnelServer(
        chain: [Certificate], key: Certificate.PrivateKey, ca: Certificate
    ) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: try chain.map { .certificate(try nioCertificate($0)) },
            privateKey: .privateKey(try nioKey(key))
        )
        configuration.minimumTLSVersion = .tlsv13
        configuration.certificateVerification = .optionalVerification
        configuration.trustRoots = .certificates([try nioCertificate(ca)])
        return try NIOSSLContext(configuration: configuration)
    }

    /// The secure port (10263): a client certificate signed by the client CA is required.
    public static func callerServer(
        chain: [Certificate], key: Certificate.PrivateKey, clientCA: NIOSSLTrustRoots
    ) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: try chain.map { .certificate(try nioCertificate($0)) },
            privateKey: .privateKey(try nioKey(key))
        )
        configuration.minimumTLSVersion = .tlsv12
        configuration.certificateVerification = .noHostnameVerification
        configuration.trustRoots = clientCA
        return try NIOSSLContext(configuration: configuration)
    }

    /// An agent's tunnel client: trusts only the tunnel CA, presents the node certificate.
    public static func agentClient(
        certificate: Certificate, key: Certificate.PrivateKey, ca: Certificate
    ) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv13
        configuration.trustRoots = .certificates([try nioCertificate(ca)])
        configuration.certificateChain = [.certificate(try nioCertificate(certificate))]
        configuration.privateKey = .privateKey(try nioKey(key))
        configuration.certificateVerification = .fullVerification
        return try NIOSSLContext(configuration: configuration)
    }

    /// A joining agent's first contact: it has no CA yet, so the handshake does not verify; the agent checks the
    /// server's certificate against the pinned CA hash itself once the CA arrives.
    public static func joinClient() throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv13
        configuration.certificateVerification = .none
        return try NIOSSLContext(configuration: configuration)
    }
}

extension NIOSSLCertificate {
    /// This certificate as a swift-certificates value.
    public func x509() throws -> Certificate {
        try Certificate(derEncoded: try toDERBytes())
    }
}
