import ArgumentParser
import Foundation
import TunnelPKI

/// The README's main job. For now it builds a complete PKI in a temporary folder and shows what it made;
/// the tunnel issue turns it into a server, an agent and an edge service on loopback.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Create a tunnel PKI in a temporary folder and show what it made."
    )

    @Option(name: .customLong("pki-dir"), help: "Folder for the demo PKI (default: a new temporary folder).")
    var directory: String?

    func run() throws {
        try reportingErrors {
            let folder = directory ?? (NSTemporaryDirectory() + "edgetunnel-demo-\(UUID().uuidString.prefix(8))")
            let paths = PKIPaths(directory: folder)
            if AtomicFile.exists(paths.caCertificate) {
                throw PKIError(.alreadyExists, "\(paths.caCertificate) already exists; give an empty --pki-dir")
            }
            let ca = try CertificateAuthority.create()
            try ca.write(to: paths)
            let server = try ca.issueServerCertificate(sans: try ServerSANs(ips: [], dnsNames: ["localhost"]))
            try server.write(certificatePath: paths.serverCertificate, keyPath: paths.serverKey)
            let client = try ca.issueClientCertificate(commonName: "demo-operator")
            try client.write(certificatePath: paths.file("demo-operator.crt"), keyPath: paths.file("demo-operator.key"))
            let (token, _) = try TokenStore(paths: paths).create(ttl: 3600, description: "demo")

            print("EdgeTunnel demo PKI in \(folder)\n")
            for (title, file) in [
                ("Tunnel CA", paths.caCertificate), ("Server certificate", paths.serverCertificate),
                ("Operator client certificate", paths.file("demo-operator.crt")),
            ] {
                let summary = try CertificateSummary(try PEMFiles.certificate(at: file))
                print("\(title): \(file)")
                print("  subject \(summary.subject), valid until \(Timestamps.iso8601(summary.notAfter))")
                if !summary.dnsNames.isEmpty || !summary.ipAddresses.isEmpty {
                    print("  SANs \((summary.ipAddresses + summary.dnsNames).joined(separator: ", "))")
                }
                print("  usage \(summary.isCA ? "CA" : summary.extendedKeyUsage.joined(separator: ", "))")
            }
            print("\nBootstrap token (valid 1h): \(token)")
            print("CA hash for agents:         \(try ca.publicKeyHash)")
            print("\nCheck with openssl:  openssl verify -CAfile \(paths.caCertificate) \(paths.serverCertificate)")
        }
    }
}
