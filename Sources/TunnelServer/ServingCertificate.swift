import Foundation
import Logging
import TunnelPKI
import X509

/// The serving certificate: reused while it matches the wanted SANs and is far from expiry, else re-issued.
enum ServingCertificate {
    static func ensure(
        paths: PKIPaths, sans wanted: ServerSANs, authority: CertificateAuthority, validity: TimeInterval,
        logger: Logger
    ) throws
        -> IssuedCredential
    {
        if AtomicFile.exists(paths.serverCertificate),
            let (certificate, key) = try? PEMFiles.keyPair(certificate: paths.serverCertificate, key: paths.serverKey),
            authority.certificate.publicKey.isValidSignature(certificate.signature, for: certificate),
            (try? CertificateSummary.sans(of: certificate)) == wanted,
            Date() < certificate.renewalTime
        {
            logger.info("reusing serving certificate \(paths.serverCertificate)")
            return IssuedCredential(certificate: certificate, privateKey: key)
        }
        let issued = try authority.issueServerCertificate(sans: wanted, validity: validity)
        try issued.write(certificatePath: paths.serverCertificate, keyPath: paths.serverKey)
        logger.info(
            "issued serving certificate",
            metadata: [
                "sans": "\((wanted.ipAddresses.map(\.description) + wanted.dnsNames).joined(separator: ","))"
            ])
        return issued
    }
}
