import ArgumentParser
import Foundation
import TunnelPKI
import TunnelSupport

struct PKICommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pki",
        abstract: "Create the tunnel CA and issue certificates from it.",
        subcommands: [Init.self, IssueServer.self, IssueClient.self, CAHashCommand.self, Show.self]
    )
}

struct PKIDirectoryOption: ParsableArguments {
    @Option(name: .customLong("pki-dir"), help: "The PKI folder.")
    var directory: String = PKIPaths.defaultServerDirectory

    var paths: PKIPaths { PKIPaths(directory: directory) }
}

extension PKICommand {
    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create the tunnel CA (ECDSA P-256, ca.crt and ca.key) in the PKI folder."
        )

        @OptionGroup var pki: PKIDirectoryOption

        @Option(help: "Validity of the CA.")
        var validity: String = "3650d"

        @Option(name: .customLong("common-name"), help: "Common name of the CA.")
        var commonName: String = CertificateAuthority.defaultCommonName

        @Flag(help: "Replace an existing CA (every certificate it issued stops being trusted).")
        var force = false

        func run() throws {
            try reportingErrors {
                let paths = pki.paths
                let validity = try Durations.parse(self.validity, what: "--validity")
                guard validity > 0 else {
                    throw ConfigurationError("--validity must be positive")
                }
                if !force && (AtomicFile.exists(paths.caCertificate) || AtomicFile.exists(paths.caKey)) {
                    throw PKIError(
                        .alreadyExists,
                        "\(paths.caCertificate) already exists; pass --force to replace the CA"
                    )
                }
                let ca = try CertificateAuthority.create(commonName: commonName, validity: validity)
                try ca.write(to: paths)
                print("created CA \(paths.caCertificate) and key \(paths.caKey)")
                print("valid until \(Timestamps.iso8601(ca.certificate.notValidAfter))")
                print("CA hash for agents (--ca-cert-hash): \(try ca.publicKeyHash)")
            }
        }
    }

    struct IssueServer: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "issue-server",
            abstract: "Issue the tunnel server's serving certificate (server.crt, server.key).",
            discussion: """
                The SANs are exactly the given addresses plus 127.0.0.1 and the names of the \
                x-tunnel-server-svc Service in kube-system.
                """
        )

        @OptionGroup var pki: PKIDirectoryOption

        @Option(name: .customLong("ip"), help: "An IP address the server is reached at (repeatable).")
        var ips: [String] = []

        @Option(name: .customLong("dns"), help: "A DNS name the server is reached at (repeatable).")
        var dnsNames: [String] = []

        @Option(help: "Validity in days.")
        var days: Int = 365

        func run() throws {
            try reportingErrors {
                let sans = try ServerSANs(ips: ips, dnsNames: dnsNames)
                guard days > 0 else { throw ConfigurationError("--days must be positive, got \(days)") }
                let paths = pki.paths
                let ca = try CertificateAuthority.load(from: paths)
                let issued = try ca.issueServerCertificate(sans: sans, validity: Double(days) * 86400)
                try issued.write(certificatePath: paths.serverCertificate, keyPath: paths.serverKey)
                print("issued \(paths.serverCertificate) and key \(paths.serverKey)")
                print("SANs: \((sans.ipAddresses.map(\.description) + sans.dnsNames).joined(separator: ", "))")
                print("valid until \(Timestamps.iso8601(issued.certificate.notValidAfter))")
            }
        }
    }

    struct IssueClient: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "issue-client",
            abstract: "Issue a client certificate for a cloud-side caller of the tunnel (NAME.crt, NAME.key)."
        )

        @OptionGroup var pki: PKIDirectoryOption

        @Option(help: "Common name of the caller, e.g. kube-apiserver.")
        var name: String

        @Option(name: .customLong("org"), help: "An organisation for the certificate (repeatable).")
        var organizations: [String] = []

        @Option(name: .customLong("out-dir"), help: "Where to write NAME.crt and NAME.key (default: the PKI folder).")
        var outDirectory: String?

        @Option(help: "Validity in days.")
        var days: Int = 365

        func run() throws {
            try reportingErrors {
                guard !name.isEmpty, !name.contains("/"), !name.hasPrefix("."), name != ".." else {
                    throw ConfigurationError("invalid client name \"\(name)\": it names the output files")
                }
                guard days > 0 else { throw ConfigurationError("--days must be positive, got \(days)") }
                let paths = pki.paths
                let ca = try CertificateAuthority.load(from: paths)
                let issued = try ca.issueClientCertificate(
                    commonName: name, organizations: organizations, validity: Double(days) * 86400
                )
                let out = PKIPaths(directory: outDirectory ?? paths.directory)
                try AtomicFile.makeDirectory(out.directory, mode: 0o700)
                let certificatePath = out.file("\(name).crt")
                let keyPath = out.file("\(name).key")
                try issued.write(certificatePath: certificatePath, keyPath: keyPath)
                print("issued \(certificatePath) and key \(keyPath) for \(name)")
            }
        }
    }

    struct CAHashCommand: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "ca-hash",
            abstract: "Print sha256:<hex> of the CA's public key, for agents' --ca-cert-hash."
        )

        @OptionGroup var pki: PKIDirectoryOption

        func run() throws {
            try reportingErrors {
                let certificate = try PEMFiles.certificate(at: pki.paths.caCertificate)
                try CertificateAuthority.checkIsCA(certificate, path: pki.paths.caCertificate)
                print(try CAHash.of(certificate))
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show a certificate: subject, issuer, SANs, validity, fingerprint."
        )

        @Argument(help: "A PEM certificate file.")
        var file: String

        @Option(help: "text or json.")
        var output: OutputFormat = .text

        func run() throws {
            try reportingErrors {
                let summary = try CertificateSummary(try PEMFiles.certificate(at: file))
                switch output {
                case .json:
                    let encoder = JSONEncoder()
                    encoder.dateEncodingStrategy = .iso8601
                    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
                    print(String(decoding: try encoder.encode(summary), as: UTF8.self))
                case .text:
                    print(render(summary))
                }
            }
        }

        private func render(_ s: CertificateSummary) -> String {
            let now = Date()
            let state =
                s.notAfter < now ? "EXPIRED" : "expires in \(Durations.format(s.notAfter.timeIntervalSince(now)))"
            var lines = [
                "Subject:      \(s.subject)",
                "Issuer:       \(s.issuer)",
                "Serial:       \(s.serialNumber)",
                "Not before:   \(Timestamps.iso8601(s.notBefore))",
                "Not after:    \(Timestamps.iso8601(s.notAfter)) (\(state))",
                "CA:           \(s.isCA ? "yes" : "no")",
            ]
            if !s.extendedKeyUsage.isEmpty {
                lines.append("Key usage:    \(s.extendedKeyUsage.joined(separator: ", "))")
            }
            if !s.dnsNames.isEmpty { lines.append("DNS names:    \(s.dnsNames.joined(separator: ", "))") }
            if !s.ipAddresses.isEmpty { lines.append("IP addresses: \(s.ipAddresses.joined(separator: ", "))") }
            lines.append("SHA-256:      \(s.sha256Fingerprint)")
            lines.append("Key hash:     \(s.publicKeyHash)")
            return lines.joined(separator: "\n")
        }
    }
}
