import Crypto
import Foundation
import Testing
import X509

@testable import TunnelPKI

@Suite struct CertificateAuthorityTests {
    @Test func createdCAIsWrittenPrivatelyAndLoadsBack() throws {
        let dir = TemporaryDirectory()
        let paths = PKIPaths(directory: dir.file("pki"))
        let ca = try CertificateAuthority.create()
        try ca.write(to: paths)

        #expect(mode(of: paths.directory) == 0o700)
        #expect(mode(of: paths.caKey) == 0o600)
        #expect(mode(of: paths.caCertificate) == 0o644)
        let loaded = try CertificateAuthority.load(from: paths)
        #expect(loaded.certificate == ca.certificate)
        #expect(loaded.privateKey.publicKey == ca.certificate.publicKey)
        let years = ca.certificate.notValidAfter.timeIntervalSince(ca.certificate.notValidBefore) / (365 * 86400)
        #expect(years > 9.99 && years < 10.01)
        // No temporary files are left next to the real ones.
        #expect(Set(dir.snapshot().keys) == ["pki", "pki/ca.crt", "pki/ca.key"])
    }

    @Test func serverCertificateCarriesExactlyTheSANSet() throws {
        let ca = try CertificateAuthority.create()
        let sans = try ServerSANs(ips: ["10.0.3.7", "fd00::1", "10.0.3.7"], dnsNames: ["tunnel.example.com"])
        let issued = try ca.issueServerCertificate(sans: sans)

        let summary = try CertificateSummary(issued.certificate)
        #expect(Set(summary.ipAddresses) == ["10.0.3.7", "fd00::1", "127.0.0.1"])
        #expect(Set(summary.dnsNames) == Set(ServerSANs.serviceDNSNames + ["tunnel.example.com"]))
        #expect(summary.extendedKeyUsage == ["serverAuth"])
        #expect(!summary.isCA)
        #expect(try CertificateSummary.sans(of: issued.certificate) == sans)
        #expect(ca.certificate.publicKey.isValidSignature(issued.certificate.signature, for: issued.certificate))
        #expect(issued.certificate.issuer == ca.certificate.subject)
    }

    @Test func issuedCertificatesNeverOutliveTheCA() throws {
        let ca = try CertificateAuthority.create(validity: 86400)
        let issued = try ca.issueServerCertificate(sans: try ServerSANs(ips: [], dnsNames: []), validity: 365 * 86400)
        #expect(issued.certificate.notValidAfter == ca.certificate.notValidAfter)
    }

    @Test func nodeCSRIsSignedForTheNodeName() throws {
        let ca = try CertificateAuthority.create()
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let csr = try CertificateSigningRequest(
            version: .v1, subject: try DistinguishedName { CommonName("edge-node-3") }, privateKey: key,
            attributes: .init(), signatureAlgorithm: .ecdsaWithSHA256
        )
        let certificate = try ca.signNodeCSR(try csr.serializeAsPEM().pemString, nodeName: "edge-node-3")

        #expect(certificate.subject.commonName == "edge-node-3")
        #expect(certificate.subject.organizations == [CertificateAuthority.agentOrganization])
        #expect(certificate.publicKey == key.publicKey)
        #expect(try CertificateSummary(certificate).extendedKeyUsage == ["clientAuth"])
        let days = certificate.notValidAfter.timeIntervalSinceNow / 86400
        #expect(days > 29.9 && days < 30.1)
    }

    @Test func csrForAnotherNodeIsRefused() throws {
        let ca = try CertificateAuthority.create()
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let csr = try CertificateSigningRequest(
            version: .v1, subject: try DistinguishedName { CommonName("node-b") }, privateKey: key,
            attributes: .init(), signatureAlgorithm: .ecdsaWithSHA256
        )
        let error = #expect(throws: PKIError.self) {
            try ca.signNodeCSR(try csr.serializeAsPEM().pemString, nodeName: "node-a")
        }
        #expect(error?.code == .invalidCSR)
        #expect(error?.message.contains("node-b") == true)
    }

    @Test func malformedCSRAndNodeNamesAreRefused() throws {
        let ca = try CertificateAuthority.create()
        let nameError = #expect(throws: PKIError.self) { try ca.signNodeCSR("", nodeName: "Node_A") }
        #expect(nameError?.code == .invalidNodeName)
        let garbage = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        let error = #expect(throws: PKIError.self) { try ca.signNodeCSR(garbage, nodeName: "node-a") }
        #expect(error?.code == .invalidCSR)
    }

    @Test func caHashIsSHA256OfTheSubjectPublicKeyInfo() throws {
        let ca = try CertificateAuthority.create()
        guard let p256 = P256.Signing.PublicKey(ca.certificate.publicKey) else {
            Issue.record("CA key is not P-256")
            return
        }
        // derRepresentation of a P-256 public key is its SubjectPublicKeyInfo.
        let expected = "sha256:" + SHA256.hash(data: p256.derRepresentation).map { String(format: "%02x", $0) }.joined()
        #expect(try ca.publicKeyHash == expected)
        #expect(
            try CAHash.validate(expected.uppercased().replacingOccurrences(of: "SHA256", with: "sha256")) == expected)
        #expect(throws: PKIError.self) { try CAHash.validate("sha256:1234") }
    }
}

@Suite struct LoadingErrorsTests {
    let dir = TemporaryDirectory()

    func validCA() throws -> PKIPaths {
        let paths = PKIPaths(directory: dir.file("pki"))
        try CertificateAuthority.create().write(to: paths)
        return paths
    }

    func loadError(_ paths: PKIPaths, now: Date = Date()) -> PKIError? {
        #expect(throws: PKIError.self) { try CertificateAuthority.load(from: paths, now: now) }
    }

    @Test func missingFileIsNamed() throws {
        let paths = PKIPaths(directory: dir.file("nothing"))
        let error = loadError(paths)
        #expect(error?.code == .fileMissing)
        #expect(error?.message.contains(paths.caCertificate) == true)
    }

    @Test func truncatedAndNonPEMFilesAreNamed() throws {
        let paths = try validCA()
        let text = try String(contentsOfFile: paths.caCertificate, encoding: .utf8)
        _ = dir.write(String(text.prefix(text.count / 2)), to: "pki/ca.crt")
        var error = loadError(paths)
        #expect(error?.code == .invalidPEM)
        #expect(error?.message.hasPrefix(paths.caCertificate) == true)

        _ = dir.write("hello, I am not a certificate\n", to: "pki/ca.crt")
        error = loadError(paths)
        #expect(error?.code == .invalidPEM)

        _ = dir.write("", to: "pki/ca.crt")
        error = loadError(paths)
        #expect(error?.message.contains("empty") == true)
    }

    @Test func keyThatDoesNotMatchIsRefused() throws {
        let paths = try validCA()
        let other = try CertificateAuthority.create()
        _ = dir.write(try PEMFiles.pem(other.privateKey), to: "pki/ca.key")
        let error = loadError(paths)
        #expect(error?.code == .keyMismatch)
        #expect(error?.message.contains(paths.caKey) == true)
    }

    @Test func leafCertificateIsNotACA() throws {
        let paths = try validCA()
        let ca = try CertificateAuthority.load(from: paths)
        let leaf = try ca.issueClientCertificate(commonName: "kube-apiserver")
        try leaf.write(certificatePath: paths.caCertificate, keyPath: paths.caKey)
        #expect(loadError(paths)?.code == .notACertificateAuthority)
    }

    @Test func expiredCAIsRefused() throws {
        let paths = try validCA()
        let error = loadError(paths, now: Date().addingTimeInterval(11 * 365 * 86400))
        #expect(error?.code == .certificateExpired)
        #expect(error?.message.contains("expired") == true)
    }

    @Test func errorsAreOneLine() {
        let error = PKIError(.invalidPEM, "first line\nsecond line")
        #expect(!error.message.contains("\n"))
    }
}

@Suite struct AddressTests {
    @Test func sanSetAlwaysHasLoopbackAndServiceNames() throws {
        let sans = try ServerSANs(ips: [], dnsNames: [])
        #expect(sans.ipAddresses.map(\.description) == ["127.0.0.1"])
        #expect(sans.dnsNames == ServerSANs.serviceDNSNames.sorted())
        #expect(sans.dnsNames.contains("x-tunnel-server-svc.kube-system.svc.cluster.local"))
    }

    @Test(arguments: ["10.0.0.300", "1.2.3", "", "fd00:::1", "example.com"])
    func invalidIPsAreNamed(_ text: String) {
        let error = #expect(throws: PKIError.self) { try ServerSANs(ips: [text], dnsNames: []) }
        #expect(error?.code == .invalidIPAddress)
        #expect(error?.message.contains("\"\(text)\"") == true)
    }

    @Test(arguments: ["Bad_Name", "-lead.example", "a..b", "", String(repeating: "a", count: 64) + ".com", "10.0.0.1"])
    func invalidDNSNamesAreNamed(_ text: String) {
        let error = #expect(throws: PKIError.self) { try ServerSANs(ips: [], dnsNames: [text]) }
        #expect(error?.code == .invalidDNSName)
    }

    @Test func validNames() {
        #expect(DNSName.isValid("edge-node-3"))
        #expect(DNSName.isValid("x-tunnel-server-svc.kube-system.svc"))
        #expect(DNSName.isValid("*.example.com", allowWildcard: true))
        #expect(!DNSName.isValid("*.example.com"))
    }

    @Test func ipAddressesRoundTrip() {
        #expect(IPAddress("fd00:0:0::1")?.description == "fd00::1")
        #expect(IPAddress("[::1]")?.bytes.count == 16)
        #expect(IPAddress("10.0.3.7")?.bytes == [10, 0, 3, 7])
    }
}
