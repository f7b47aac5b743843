import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOPosix
import Testing
import TunnelPKI

@testable import TunnelServer

/// The serving certificate names the addresses of every Service the server is reached through, whichever order
/// their watches report in. Each watch runs on its own task: their updates arrive at the same time, at start.
@Suite struct ServingAddressesTests {
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
            guard once.withLockedValue({ let first = $0; $0 = false; return first }) else { return }
            second.enter()
            Thread.detachNewThread {
                try? server.setServiceAddresses("kube-system/internal", ips: ["127.0.0.8"], dnsNames: [])
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
