import Crypto
import Foundation
import X509

/// What an operator wants to know of a certificate: who, by whom, for which addresses, until when.
public struct CertificateSummary: Codable, Hashable, Sendable {
    public var subject: String
    public var issuer: String
    public var serialNumber: String
    public var notBefore: Date
    public var notAfter: Date
    public var isCA: Bool
    public var dnsNames: [String]
    public var ipAddresses: [String]
    public var extendedKeyUsage: [String]
    public var sha256Fingerprint: String
    public var publicKeyHash: String

    public init(_ certificate: Certificate) throws {
        subject = certificate.subject.description
        issuer = certificate.issuer.description
        serialNumber = certificate.serialNumber.bytes.hexString
        notBefore = certificate.notValidBefore
        notAfter = certificate.notValidAfter
        if case .isCertificateAuthority = try certificate.extensions.basicConstraints {
            isCA = true
        } else {
            isCA = false
        }
        var dns: [String] = []
        var ips: [String] = []
        for name in try certificate.extensions.subjectAlternativeNames ?? SubjectAlternativeNames() {
            switch name {
            case .dnsName(let value): dns.append(value)
            case .ipAddress(let octets):
                ips.append(IPAddress(bytes: octets.bytes)?.description ?? octets.bytes.hexString)
            default: continue
            }
        }
        dnsNames = dns
        ipAddresses = ips
        extendedKeyUsage = try (certificate.extensions.extendedKeyUsage.map(Array.init) ?? []).map { usage in
            switch usage {
            case .serverAuth: "serverAuth"
            case .clientAuth: "clientAuth"
            default: usage.description
            }
        }
        sha256Fingerprint = SHA256.hash(data: try PEMFiles.der(certificate)).map {
            let hex = [$0].hexString
            return hex.uppercased()
        }.joined(separator: ":")
        publicKeyHash = try CAHash.of(certificate)
    }

    /// The SANs of a certificate as a ``ServerSANs`` value, to compare with what a server should carry.
    public static func sans(of certificate: Certificate) throws -> ServerSANs {
        let summary = try CertificateSummary(certificate)
        return ServerSANs(exactIPs: summary.ipAddresses.compactMap(IPAddress.init), exactDNSNames: summary.dnsNames)
    }
}
