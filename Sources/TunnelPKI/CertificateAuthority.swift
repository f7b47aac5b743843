import Crypto
import Foundation
import SwiftASN1
import X509

/// A certificate and its private key, as issued by the tunnel CA.
public struct IssuedCredential: Sendable {
    public let certificate: Certificate
    public let privateKey: Certificate.PrivateKey

    public init(certificate: Certificate, privateKey: Certificate.PrivateKey) {
        self.certificate = certificate
        self.privateKey = privateKey
    }

    /// Writes the key (0600) and then the certificate (0644), each atomically.
    public func write(certificatePath: String, keyPath: String) throws {
        let keyPEM = try PEMFiles.pem(privateKey)
        let certPEM = try PEMFiles.pem(certificate)
        try AtomicFile.write(Array(keyPEM.utf8), to: keyPath, mode: 0o600)
        try AtomicFile.write(Array(certPEM.utf8), to: certificatePath, mode: 0o644)
    }
}

/// The tunnel's certificate authority: the root that every server, agent and cloud caller certificate chains to.
///
/// ECDSA P-256 throughout. Certificates are back-dated five minutes so that a peer whose clock is slightly
/// behind still accepts them.
public struct CertificateAuthority: Sendable {
    public static let defaultCommonName = "edge-tunnel-ca"
    public static let defaultValidity: TimeInterval = 10 * 365 * 86400
    /// The organisation every agent certificate carries; the server requires it on tunnel connections.
    public static let agentOrganization = "edge-tunnel:agents"
    /// Agent certificates are short-lived and renewed over the tunnel.
    public static let defaultNodeValidity: TimeInterval = 30 * 86400
    /// Certificates start this long before they are issued, for clock skew between machines.
    public static let backdate: TimeInterval = 300

    public let certificate: Certificate
    public let privateKey: Certificate.PrivateKey

    public init(certificate: Certificate, privateKey: Certificate.PrivateKey) {
        self.certificate = certificate
        self.privateKey = privateKey
    }

    /// Creates a new self-signed CA.
    public static func create(
        commonName: String = defaultCommonName,
        validity: TimeInterval = defaultValidity,
        now: Date = Date()
    ) throws -> CertificateAuthority {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let name = try DistinguishedName {
            OrganizationName("EdgeTunnel")
            CommonName(commonName)
        }
        let certificate = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: key.publicKey,
            notValidBefore: now - backdate,
            notValidAfter: now + validity,
            issuer: name,
            subject: name,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(digitalSignature: true, keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: key.publicKey)
            },
            issuerPrivateKey: key
        )
        return CertificateAuthority(certificate: certificate, privateKey: key)
    }

    /// Loads a CA and checks it: both files readable PEM, the key belongs to the certificate, the certificate is
    /// a CA and is valid now.
    public static func load(certificatePath: String, keyPath: String, now: Date = Date()) throws -> CertificateAuthority
    {
        let (certificate, key) = try PEMFiles.keyPair(certificate: certificatePath, key: keyPath)
        try checkIsCA(certificate, path: certificatePath)
        try PEMFiles.checkValidity(certificate, path: certificatePath, now: now)
        return CertificateAuthority(certificate: certificate, privateKey: key)
    }

    /// Loads the CA of a PKI folder.
    public static func load(from paths: PKIPaths, now: Date = Date()) throws -> CertificateAuthority {
        try load(certificatePath: paths.caCertificate, keyPath: paths.caKey, now: now)
    }

    /// Throws unless `certificate` carries basic constraints that make it a CA.
    public static func checkIsCA(_ certificate: Certificate, path: String) throws {
        let constraints: BasicConstraints?
        do {
            constraints = try certificate.extensions.basicConstraints
        } catch {
            throw PKIError(.notACertificateAuthority, "\(path): basic constraints cannot be decoded (\(error))")
        }
        guard case .isCertificateAuthority = constraints else {
            throw PKIError(.notACertificateAuthority, "\(path): certificate is not a CA (no basicConstraints CA:TRUE)")
        }
    }

    /// Writes the CA into a PKI folder (creating it 0700): key 0600, certificate 0644, both atomically.
    public func write(to paths: PKIPaths) throws {
        try AtomicFile.makeDirectory(paths.directory, mode: 0o700)
        try IssuedCredential(certificate: certificate, privateKey: privateKey)
            .write(certificatePath: paths.caCertificate, keyPath: paths.caKey)
    }

    /// `sha256:<hex>` of the CA's DER-encoded SubjectPublicKeyInfo: kubeadm's `--discovery-token-ca-cert-hash`.
    public var publicKeyHash: String {
        get throws { try CAHash.of(certificate) }
    }

    /// A serving certificate for the tunnel server whose SANs are exactly `sans`.
    public func issueServerCertificate(
        sans: ServerSANs,
        commonName: String = "edge-tunnel-server",
        validity: TimeInterval = 365 * 86400,
        now: Date = Date()
    ) throws -> IssuedCredential {
        var names: [GeneralName] = sans.dnsNames.map { .dnsName($0) }
        names += sans.ipAddresses.map { .ipAddress(ASN1OctetString(contentBytes: ArraySlice($0.bytes))) }
        let subject = try DistinguishedName { CommonName(commonName) }
        return try issue(subject: subject, validity: validity, now: now, usage: .serverAuth, sans: names)
    }

    /// A client certificate for a cloud-side caller of the tunnel (kube-apiserver, an operator).
    public func issueClientCertificate(
        commonName: String,
        organizations: [String] = [],
        validity: TimeInterval = 365 * 86400,
        now: Date = Date()
    ) throws -> IssuedCredential {
        guard !commonName.isEmpty, commonName.utf8.count <= 64,
            commonName.unicodeScalars.allSatisfy({ $0.value >= 0x20 && $0.value != 0x7f })
        else {
            throw PKIError(.invalidArgument, "invalid client name \"\(commonName)\": 1-64 printable characters")
        }
        let subject = try DistinguishedName {
            for organization in organizations { OrganizationName(organization) }
            CommonName(commonName)
        }
        return try issue(subject: subject, validity: validity, now: now, usage: .clientAuth, sans: [])
    }

    /// Signs an agent's CSR for `nodeName`: CN = node name, O = `edge-tunnel:agents`, client auth.
    ///
    /// The CSR's own signature must verify, and if it names a common name that name must be `nodeName`: a
    /// joining agent cannot obtain a certificate for another node. Only the CSR's public key is used.
    /// `ips` become the certificate's IP SANs: the node IPs the node may claim when it registers.
    public func signNodeCSR(
        _ csrPEM: String,
        nodeName: String,
        ips: [IPAddress] = [],
        validity: TimeInterval = defaultNodeValidity,
        now: Date = Date()
    ) throws -> Certificate {
        let node = try DNSName.validateNodeName(nodeName)
        let csr: CertificateSigningRequest
        do {
            csr = try CertificateSigningRequest(pemEncoded: csrPEM)
        } catch {
            throw PKIError(.invalidCSR, "certificate signing request for node \(node) cannot be decoded (\(error))")
        }
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else {
            throw PKIError(.invalidCSR, "certificate signing request for node \(node) has an invalid signature")
        }
        if let requested = csr.subject.commonName, requested != node {
            throw PKIError(
                .invalidCSR,
                "certificate signing request names node \"\(requested)\" but the join is for node \"\(node)\""
            )
        }
        let subject = try DistinguishedName {
            OrganizationName(Self.agentOrganization)
            CommonName(node)
        }
        return try makeCertificate(
            publicKey: csr.publicKey, subject: subject, validity: validity, now: now, usage: .clientAuth,
            sans: ips.map { .ipAddress(ASN1OctetString(contentBytes: ArraySlice($0.bytes))) }
        )
    }

    /// A fresh key and certificate for a node, without a CSR (for tests, the demo and the swarm benchmark).
    public func issueNodeCertificate(
        nodeName: String,
        validity: TimeInterval = defaultNodeValidity,
        now: Date = Date()
    ) throws -> IssuedCredential {
        let node = try DNSName.validateNodeName(nodeName)
        let subject = try DistinguishedName {
            OrganizationName(Self.agentOrganization)
            CommonName(node)
        }
        return try issue(subject: subject, validity: validity, now: now, usage: .clientAuth, sans: [])
    }

    private func issue(
        subject: DistinguishedName,
        validity: TimeInterval,
        now: Date,
        usage: ExtendedKeyUsage.Usage,
        sans: [GeneralName]
    ) throws -> IssuedCredential {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let certificate = try makeCertificate(
            publicKey: key.publicKey, subject: subject, validity: validity, now: now, usage: usage, sans: sans
        )
        return IssuedCredential(certificate: certificate, privateKey: key)
    }

    private func makeCertificate(
        publicKey: Certificate.PublicKey,
        subject: DistinguishedName,
        validity: TimeInterval,
        now: Date,
        usage: ExtendedKeyUsage.Usage,
        sans: [GeneralName]
    ) throws -> Certificate {
        guard validity > 0 else {
            throw PKIError(.invalidDuration, "certificate validity must be positive")
        }
        // A certificate never outlives the CA that signed it.
        let notAfter = min(now + validity, certificate.notValidAfter)
        let authorityKeyID =
            try certificate.extensions.subjectKeyIdentifier?.keyIdentifier
            ?? SubjectKeyIdentifier(hash: certificate.publicKey).keyIdentifier
        return try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: publicKey,
            notValidBefore: now - Self.backdate,
            notValidAfter: notAfter,
            issuer: certificate.subject,
            subject: subject,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([usage])
                AuthorityKeyIdentifier(keyIdentifier: authorityKeyID)
                SubjectKeyIdentifier(hash: publicKey)
                if !sans.isEmpty {
                    SubjectAlternativeNames(sans)
                }
            },
            issuerPrivateKey: privateKey
        )
    }
}

/// The CA public-key pin that agents check on first contact.
public enum CAHash {
    /// `sha256:<hex>` of the certificate's DER-encoded SubjectPublicKeyInfo.
    public static func of(_ certificate: Certificate) throws -> String {
        var serializer = DER.Serializer()
        try serializer.serialize(certificate.publicKey)
        let spki = serializer.serializedBytes
        return "sha256:" + SHA256.hash(data: spki).hexString
    }

    /// Checks the form `sha256:` + 64 hex digits, or throws an error naming the value.
    public static func validate(_ text: String) throws -> String {
        let lower = text.lowercased()
        let hex = lower.dropFirst("sha256:".count)
        guard lower.hasPrefix("sha256:"), hex.count == 64, hex.allSatisfy(\.isHexDigit) else {
            throw PKIError(.invalidCAHash, "invalid CA hash \"\(text)\": expected sha256: followed by 64 hex digits")
        }
        return lower
    }
}

extension Sequence where Element == UInt8 {
    /// Lower-case hex.
    public var hexString: String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        for byte in self {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0xf)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}

extension Digest {
    var hexString: String { Array(self).hexString }
}
