import Foundation
import Logging
import NIOPosix
import Testing
import TunnelPKI

@testable import TunnelServer

/// The serving certificate names the addresses of every Service the server is reached through, whichever order
/// their watches report in. Each watch runs on its own task: their updates arrive at the same time, at start.
@Suite struct ServingAddressesTests {
    @Test func concurrentServiceUpdatesAllReachTheCertificate() throws {
        let directory = NSTemporaryDirectory() + "edgetunnel-sans-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try CertificateAuthority.create().write(to: PKIPaths(directory: directory))
        let services = (1...8).map { "kube-system/svc-\($0)" }
        var configuration = ServerConfiguration()
        configuration.pkiDirectory = directory
        configuration.addressServices = services
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        for round in 0..<20 {
            let server = try TunnelServer(configuration: configuration, logger: Logger(label: "test"), group: group)
            DispatchQueue.concurrentPerform(iterations: services.count) { index in
                try? server.setServiceAddresses(services[index], ips: ["127.0.\(round).\(index + 10)"], dnsNames: ["svc-\(index).example"])
            }
            let named = Set(server.core.sans.ipAddresses.map(\.description))
            let expected = Set((0..<services.count).map { "127.0.\(round).\($0 + 10)" })
            #expect(expected.isSubset(of: named), "round \(round): missing \(expected.subtracting(named).sorted())")
            let names = Set(server.core.sans.dnsNames)
            #expect(Set((0..<services.count).map { "svc-\($0).example" }).isSubset(of: names))
            #expect(server.unlistedAddressService == nil)
        }
    }
}
