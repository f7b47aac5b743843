import Crypto
import Foundation
import SwiftASN1
import X509

/// Reading certificates and keys from PEM files, with errors that name the file and the reason.
public enum PEMFiles {
    /// Reads the first certificate of a PEM file.
    public static func certificate(at path: String) throws -> Certificate {
        try certificates(at: path)[0]
    }

    /// Reads every certificate of a PEM file (a chain or a bundle); at least one.
    public static func certificates(at path: String) throws -> [Certificate] {
        let text = try pemText(at: path)
        let documents: [PEMDocument]
        do {
            documents = try PEMDocument.parseMultiple(pemString: text)
        } catch {
            throw PKIError(.invalidPEM, "\(path): not a valid PEM certificate file (\(error))")
        }
        let certificates = documents.filter { $0.discriminator == "CERTIFICATE" }
        guard !certificates.isEmpty else {
            throw PKIError(.invalidPEM, "\(path): holds no CERTIFICATE block")
        }
        return try certificates.map { document in
            do {
                return try Certificate(pemDocument: document)
            } catch {
                throw PKIError(.invalidPEM, "\(path): certificate cannot be decoded (\(error))")
            }
        }
    }

    /// Reads a private key (PKCS#8, SEC1 or PKCS#1) from a PEM file.
    public static func privateKey(at path: String) throws -> Certificate.PrivateKey {
        let text = try pemText(at: path)
        do {
            return try Certificate.PrivateKey(pemEncoded: text)
        } catch {
            throw PKIError(.invalidPEM, "\(path): not a valid PEM private key (\(error))")
        }
    }

    /// Reads a certificate and its key and checks that they belong together.
    public static func keyPair(
        certificate certPath: String, key keyPath: String
    ) throws -> (Certificate, Certificate.PrivateKey) {
        let certificate = try certificate(at: certPath)
        let key = try privateKey(at: keyPath)
        guard key.publicKey == certificate.publicKey else {
            throw PKIError(.keyMismatch, "\(keyPath): private key does not match the certificate in \(certPath)")
        }
        return (certificate, key)
    }

    /// Checks that `certificate` (read from `path`) is valid at `now`, allowing for `skew` of clock difference.
    public static func checkValidity(
        _ certificate: Certificate, path: String, now: Date, skew: TimeInterval = 300
    ) throws {
        if certificate.notValidAfter < now {
            throw PKIError(
                .certificateExpired,
                "\(path): certificate expired at \(Timestamps.iso8601(certificate.notValidAfter))"
            )
        }
        if certificate.notValidBefore > now.addingTimeInterval(skew) {
            throw PKIError(
                .certificateNotYetValid,
                "\(path): certificate is not valid before \(Timestamps.iso8601(certificate.notValidBefore))"
            )
        }
    }

    /// PEM text of a certificate, ending in a newline so that PEMs can be concatenated.
    public static func pem(_ certificate: Certificate) throws -> String {
        try certificate.serializeAsPEM().pemString + "\n"
    }

    /// PEM text of a private key, ending in a newline.
    public static func pem(_ key: Certificate.PrivateKey) throws -> String {
        try key.serializeAsPEM().pemString + "\n"
    }

    /// The DER bytes of a certificate.
    public static func der(_ certificate: Certificate) throws -> [UInt8] {
        var serializer = DER.Serializer()
        try serializer.serialize(certificate)
        return serializer.serializedBytes
    }

    private static func pemText(at path: String) throws -> String {
        let bytes = try AtomicFile.read(path)
        guard !bytes.isEmpty else {
            throw PKIError(.invalidPEM, "\(path): file is empty")
        }
        guard let text = String(validating: bytes, as: UTF8.self), text.contains("-----BEGIN ") else {
            throw PKIError(.invalidPEM, "\(path): not a PEM file (no -----BEGIN line)")
        }
        return text
    }
}

/// Dates as operators read them.
public enum Timestamps {
    public static func iso8601(_ date: Date) -> String {
        date.formatted(.iso8601)
    }

    public static func parseISO8601(_ text: String) -> Date? {
        try? Date(text, strategy: .iso8601)
    }
}

extension DistinguishedName {
    /// The first common name of this name, if it has one (swift-certificates has no accessor for it).
    public var commonName: String? {
        for rdn in self {
            for attribute in rdn where attribute.type == .RDNAttributeType.commonName {
                return String(describing: attribute.value)
            }
        }
        return nil
    }

    /// Every organisation of this name.
    public var organizations: [String] {
        flatMap { rdn in
            rdn.filter { $0.type == .RDNAttributeType.organizationName }.map { String(describing: $0.value) }
        }
    }
}
