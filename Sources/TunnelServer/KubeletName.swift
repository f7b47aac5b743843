import NIOSSL
import TunnelPKI
import TunnelSupport
import X509

/// The kubelet's serving certificate must name the host the caller asked for — its node name or the node IP —
/// as kube-apiserver checks when it reaches kubelets directly. The chain was verified by the TLS handshake;
/// NIOSSL's own name check cannot run here: the kubelet sits behind a socket pair that has no peer IP.
enum KubeletName {
    struct Mismatch: Error, CustomStringConvertible { let description: String }

    static func check(_ certificate: NIOSSLCertificate?, for destination: HostPort) throws {
        guard let certificate else { throw Mismatch(description: "the kubelet presented no certificate") }
        let sans: ServerSANs
        do {
            sans = try CertificateSummary.sans(of: Certificate(derEncoded: try certificate.toDERBytes()))
        } catch {
            throw Mismatch(description: "the kubelet's certificate cannot be read: \(error)")
        }
        if let ip = IPAddress(destination.host) {
            if sans.ipAddresses.contains(ip) { return }
        } else if sans.dnsNames.contains(where: { $0.lowercased() == destination.host }) {
            return
        }
        let names = sans.dnsNames + sans.ipAddresses.map(\.description)
        throw Mismatch(
            description:
                "the kubelet's certificate names \(names.isEmpty ? "no host" : names.joined(separator: ", ")), "
                + "not \(destination.host)")
    }
}
