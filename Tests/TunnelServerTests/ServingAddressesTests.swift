import Foundation
import KubeAPI
import Logging
import NIOConcurrencyHelpers
import NIOPosix
import Testing
import TunnelPKI

@testable import TunnelServer

/// The serving certificate names the addresses of every Service the server is reached through, whichever order
/// their watches report in. Each watch runs on its own task: their updates arrive at the same time, at start.
@Suite struct ServingAddressesTests {
    /// A server on a fresh PKI folder that follows `services`; `body` runs with it, the folder is removed after.
    func withServer(services: [String], _ body: (TunnelServer) throws -> Void) throws {
        let directory = NSTemporaryDirectory() + "edgetunnel-sans-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try CertificateAuthority.create().write(to: PKIPaths(directory: directory))
        var configuration = ServerConfiguration()
        configuration.pkiDirectory = directory
        configuration.addressServices = services
        var logger = Logger(label: "test")
        logger.logLevel = .critical  // each re-issue and each refusal logs a line
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        try body(try TunnelServer(configuration: configuration, logger: logger, group: group))
    }

    func sanNames(_ server: TunnelServer) -> Set<String> {
        Set(server.core.sans.ipAddresses.map(\.description) + server.core.sans.dnsNames)
    }

    /// A Service entry that is no address is left out, not kept: the rest goes into the certificate, and every
    /// later update (the Service's, the config file's) still goes through. A wildcard is never taken. (Kept
    /// unchecked, one bad entry made every later certificate fail, and `*.example.com` went into it.)
    @Test func anEntryThatIsNoAddressIsLeftOutAndLaterUpdatesGoThrough() throws {
        try withServer(services: ["kube-system/tunnel"]) { server in
            let taken = try server.setServiceAddresses(
                "kube-system/tunnel", ips: ["10.96.0.10", "10.0.0.0/8"],
                dnsNames: ["tunnel.example", "*.example.com", "*"])
            #expect(taken.invalid == ["10.0.0.0/8", "*.example.com", "*"])
            var named = sanNames(server)
            #expect(named.isSuperset(of: ["10.96.0.10", "tunnel.example"]), "the certificate names \(named.sorted())")
            #expect(!named.contains { $0.contains("*") || $0.contains("/") })
            #expect(server.unlistedAddressService == nil)

            try server.updateAddresses(certIPs: ["127.0.0.9"], certDNSNames: ["configured.example"])
            try server.setServiceAddresses("kube-system/tunnel", ips: ["10.96.0.11"], dnsNames: ["*.example.com"])
            named = sanNames(server)
            #expect(
                named.isSuperset(of: ["127.0.0.9", "configured.example", "10.96.0.11"]),
                "the certificate names \(named.sorted())")
            #expect(!named.contains("10.96.0.10") && !named.contains("*.example.com"))
        }
    }

    /// Thousands of externalIPs would make a certificate TLS peers refuse: the update is refused with one error
    /// naming the Service and the count, the certificate in force stays, and a later update within the bound
    /// goes through.
    @Test func aServiceWithMoreAddressesThanTheBoundKeepsTheCertificateInForce() throws {
        try withServer(services: ["kube-system/tunnel", "kube-system/internal"]) { server in
            try server.setServiceAddresses("kube-system/tunnel", ips: ["10.96.0.10"], dnsNames: ["tunnel.example"])
            let before = server.core.sans
            let many = (0..<5_000).map { "10.\($0 / 65536).\($0 / 256 % 256).\($0 % 256)" }
            let refusal = #expect(throws: TunnelServer.TooManyServiceAddresses.self) {
                try server.setServiceAddresses("kube-system/tunnel", ips: many, dnsNames: [])
            }
            #expect(
                refusal?.description.contains("Service kube-system/tunnel has 5000 addresses") == true,
                "\(String(describing: refusal))")
            #expect(server.core.sans == before)
            // Exactly the bound goes through (together with the ClusterIP).
            try server.setServiceAddresses(
                "kube-system/tunnel", ips: ["10.96.0.10"] + many.prefix(ServiceAddresses.maxAddresses - 1), dnsNames: []
            )
            #expect(sanNames(server).isSuperset(of: ["10.96.0.10", "10.0.0.98"]))
            #expect(!sanNames(server).contains("10.0.0.99"))

            // A Service refused at its first list: the replica is not ready, and says why.
            #expect(throws: TunnelServer.TooManyServiceAddresses.self) {
                try server.setServiceAddresses("kube-system/internal", ips: many, dnsNames: [])
            }
            #expect(server.unlistedAddressService == "kube-system/internal")
            #expect(server.addressServiceRefusal("kube-system/internal")?.contains("has 5000 addresses") == true)
            try server.setServiceAddresses("kube-system/internal", ips: ["10.96.0.12"], dnsNames: [])
            #expect(server.unlistedAddressService == nil)
            #expect(server.addressServiceRefusal("kube-system/internal") == nil)
        }
    }

    /// Two Services' watches report at once: the first has read the addresses when the second's update runs
    /// through. The certificate in force at the end names both (without one update at a time, the first's older
    /// certificate replaced the second's).
    @Test func anUpdateThatReadTheAddressesEarlierDoesNotReplaceALaterOne() throws {
        let directory = NSTemporaryDirectory() + "edgetunnel-sans-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try CertificateAuthority.create().write(to: PKIPaths(directory: directory))
        var configuration = ServerConfiguration()
        configuration.pkiDirectory = directory
        configuration.addressServices = ["kube-system/tunnel", "kube-system/internal"]
        var logger = Logger(label: "test")
        logger.logLevel = .error  // each re-issue logs a line
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let server = try TunnelServer(configuration: configuration, logger: logger, group: group)
        let second = DispatchGroup()
        let once = NIOLockedValueBox(true)
        server.afterAddressesRead = {
            guard
                once.withLockedValue({
                    let first = $0
                    $0 = false
                    return first
                })
            else { return }
            second.enter()
            Thread.detachNewThread {
                _ = try? server.setServiceAddresses("kube-system/internal", ips: ["127.0.0.8"], dnsNames: [])
                second.leave()
            }
            Thread.sleep(forTimeInterval: 0.3)  // the second update has long finished, unless it waits for this one
        }
        try server.setServiceAddresses("kube-system/tunnel", ips: ["127.0.0.6"], dnsNames: ["tunnel.example"])
        #expect(second.wait(timeout: .now() + 10) == .success)
        let named = Set(server.core.sans.ipAddresses.map(\.description))
        #expect(named.isSuperset(of: ["127.0.0.6", "127.0.0.8"]), "the certificate names \(named.sorted())")
        #expect(server.core.sans.dnsNames.contains("tunnel.example"))
        #expect(server.unlistedAddressService == nil)
    }
}
