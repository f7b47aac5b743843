import Logging
import Testing
import TunnelSupport

@testable import TunnelServer

/// `ServerConfiguration.resolve(flags:file:)`: the one path from flags and a YAML file to a checked configuration,
/// shared by the binary, the reloader and the config fuzzer.
@Suite struct ServerConfigurationResolveTests {
    func file(_ yaml: String) throws -> ServerConfigFile { try ServerConfigFile.parse(yaml, path: "server.yaml") }

    @Test func aFlagWinsOverTheFileAndTheFileOverTheDefault() throws {
        var flags = ServerConfigFile()
        flags.tunnelPort = 20262
        flags.certIPs = ["10.0.0.9"]
        let (configuration, level) = try ServerConfiguration.resolve(
            flags: flags,
            file: try file("tunnelPort: 30262\nsecurePort: 30263\ncertIPs: [10.0.0.1]\nlogLevel: debug\n"))
        #expect(configuration.tunnelPort == 20262)
        #expect(configuration.securePort == 30263)
        #expect(configuration.metaPort == ServerConfiguration().metaPort)
        #expect(configuration.certIPs == ["10.0.0.9"])
        #expect(level == .debug)
    }

    @Test func theGRPCSocketComesFromAFlagOrTheFile() throws {
        var flags = ServerConfigFile()
        flags.grpcUdsPath = "/run/flag.sock"
        let (fromFlag, _) = try ServerConfiguration.resolve(
            flags: flags, file: try file("grpcUdsPath: /run/file.sock\n"))
        #expect(fromFlag.grpcUdsPath == "/run/flag.sock")
        let (fromFile, _) = try ServerConfiguration.resolve(
            flags: ServerConfigFile(), file: try file("grpcUdsPath: /run/file.sock\n"))
        #expect(fromFile.grpcUdsPath == "/run/file.sock")
        #expect(
            try ServerConfiguration.resolve(flags: ServerConfigFile(), file: ServerConfigFile()).0.grpcUdsPath == nil)
    }

    @Test func switchesGivenInEitherPlaceAreOnAndListsAreSplit() throws {
        var flags = ServerConfigFile()
        flags.addressService = "kube-system/a,kube-system/b,kube-system/a"
        let (configuration, _) = try ServerConfiguration.resolve(
            flags: flags, file: try file("checkNodeObjects: true\naddressService: other/c\n"))
        #expect(configuration.checkNodeObjects)
        #expect(configuration.addressServices == ["kube-system/a", "kube-system/b"])
        let (fromFile, _) = try ServerConfiguration.resolve(
            flags: ServerConfigFile(), file: try file("addressService: other/c,other/d\n"))
        #expect(fromFile.addressServices == ["other/c", "other/d"])
        #expect(!fromFile.checkNodeObjects)
    }

    /// Each bad value is refused with one line that names its flag, whether it came as a flag or from the file.
    @Test(arguments: [
        ("tunnelPort: 70000", "--tunnel-port"),
        ("serverID: \"two words\"", "--server-id"),
        ("serverCount: 0", "--server-count"),
        ("addressService: no-slash", "--address-service"),
        ("leaseLabel: novalue", "--lease-label"),
        ("poolLabel: \"bad key!\"", "--pool-label"),
        ("joinStateNamespace: a.b", "--join-state-namespace"),
        ("eventLoopThreads: 0", "--event-loop-threads"),
        ("handshakeTimeout: 0s", "--handshake-timeout"),
        ("maxBufferedMiB: 0", "--max-buffered-mib"),
        ("maxBufferedMiB: 9999999", "--max-buffered-mib"),
        ("resumeGraceSeconds: 601", "--resume-grace-seconds"),
        ("agentCertificateValidity: 1s", "--agent-certificate-validity"),
        ("logLevel: loud", "--log-level"),
        ("certIPs: [not-an-address]", "--cert-ips"),
        ("certDNSNames: [\"no spaces.example\"]", "--cert-dns-names"),
        ("udsPath: /run/et.sock\ngrpcUdsPath: /run/et.sock", "--grpc-uds-path"),
    ])
    func aBadValueIsRefusedByName(yaml: String, named: String) throws {
        let error = #expect(throws: ConfigurationError.self) {
            _ = try ServerConfiguration.resolve(flags: ServerConfigFile(), file: try file(yaml))
        }
        let message = error.map { String(describing: $0) } ?? ""
        #expect(message.contains(named), "\(message)")
        #expect(!message.contains("\n"))
    }
}
