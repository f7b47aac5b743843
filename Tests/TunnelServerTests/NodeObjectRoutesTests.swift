import Crypto
import Foundation
import Logging
import NIOCore
import NIOEmbedded
import NIOPosix
import Testing
import TunnelPKI
import X509

@testable import KubeAPI
@testable import TunnelServer
@testable import TunnelWire

/// A server with `--node-objects`, its Node directory driven with watch changes as its watch would drive it; agents
/// register over tunnels on EmbeddedChannels, their HELLO going through every check a real one does.
final class NodeRoutesFixture {
    let folder = NSTemporaryDirectory() + "edgetunnel-node-routes-\(UUID().uuidString)"
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let authority: CertificateAuthority
    let server: TunnelServer
    let nodes: NodeDirectory
    var tunnels: [EmbeddedChannel] = []

    init(nodes listed: [[String: any Sendable]]) throws {
        authority = try CertificateAuthority.create()
        try authority.write(to: PKIPaths(directory: folder))
        var configuration = ServerConfiguration()
        configuration.pkiDirectory = folder
        configuration.checkNodeObjects = true
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        server = try TunnelServer(configuration: configuration, logger: logger, group: group)
        let client = try KubeClient(config: KubeConfig(host: "127.0.0.1", port: 1), group: group)
        nodes = NodeDirectory(client: client, logger: logger)
        nodes.apply(.listed(listed))
        server.useNodeObjects(nodes)
    }

    deinit {
        for tunnel in tunnels { _ = try? tunnel.finish() }
        try? group.syncShutdownGracefully()
        try? FileManager.default.removeItem(atPath: folder)
    }

    static func node(_ name: String, _ addresses: [String]) -> [String: any Sendable] {
        [
            "metadata": ["name": name] as [String: any Sendable],
            "status": [
                "addresses": addresses.map { ["type": "InternalIP", "address": $0] as [String: any Sendable] }
            ] as [String: any Sendable],
        ]
    }

    /// One change of the Node watch, passed on to the server as ``NodeObjectsService`` does.
    func watchSays(_ change: KubeWatch.Change) {
        let update = nodes.apply(change)
        if !update.changed.isEmpty { server.nodeAddressesChanged(update.changed) }
        for name in update.deleted { server.nodeDeleted(name) }
    }

    /// The agent of `name`, whose certificate names `ips`, registers claiming them; nil if it is refused.
    func register(_ name: String, ips: [String]) throws -> AgentSession? {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let csr = try CertificateSigningRequest(
            version: .v1, subject: try DistinguishedName { CommonName(name) }, privateKey: key,
            attributes: .init(), signatureAlgorithm: .ecdsaWithSHA256)
        let certificate = try authority.signNodeCSR(
            try csr.serializeAsPEM().pemString, nodeName: name, ips: ips.compactMap { IPAddress($0) })
        let tunnel = EmbeddedChannel()
        tunnels.append(tunnel)
        let mux = TunnelMux(role: .server, eventLoop: tunnel.eventLoop, limits: server.core.limits)
        try tunnel.pipeline.syncOperations.addHandler(mux)
        try tunnel.connect(to: .init(ipAddress: "192.0.2.1", port: 40000)).wait()
        let session = AgentSession(
            nodeName: name, certificate: certificate, channel: tunnel, mux: mux, server: server.core)
        mux.delegate = session
        try tunnel.writeInbound(Hello(nodeName: name, nodeIPs: ips).frame())
        tunnel.embeddedEventLoop.run()
        return server.registry.lookup(host: name) === session ? session : nil
    }
}

/// `--node-objects` checks a node's addresses at HELLO, and again whenever its Node object changes: an address the
/// Node no longer reports (removed, or given to another Node) stops leading to the old tunnel at once. (Checked
/// only at HELLO, it kept routing to the old tunnel for as long as that lived.)
@Suite struct NodeObjectRoutesTests {
    typealias Fixture = NodeRoutesFixture

    @Test func anAddressItsNodeNoLongerReportsStopsLeadingToTheTunnel() throws {
        let fixture = try Fixture(nodes: [
            Fixture.node("edge-7", ["10.0.0.7", "10.0.1.7"]), Fixture.node("edge-8", ["10.0.0.8"]),
        ])
        let session = try #require(try fixture.register("edge-7", ips: ["10.0.0.7", "10.0.1.7"]))
        let registry = fixture.server.registry
        #expect(registry.lookup(host: "10.0.0.7") === session)
        #expect(registry.lookup(host: "10.0.1.7") === session)

        // Removed from edge-7's Node: no longer routed there. The tunnel stays, reached by the node's name.
        fixture.watchSays(.modified(Fixture.node("edge-7", ["10.0.1.7"])))
        #expect(registry.lookup(host: "10.0.0.7") == nil)
        #expect(registry.lookup(host: "10.0.1.7") === session)
        #expect(registry.lookup(host: "edge-7") === session)
        #expect(registry.routedIPs(of: "edge-7") == ["10.0.1.7"])

        // Given to another Node (in one list, after the watch lost its version): not routed to edge-7 either.
        fixture.watchSays(.listed([Fixture.node("edge-7", []), Fixture.node("edge-8", ["10.0.0.8", "10.0.1.7"])]))
        #expect(registry.lookup(host: "10.0.1.7") == nil)
        #expect(registry.lookup(host: "[10.0.1.7]") == nil)
        #expect(registry.lookup(host: "edge-7") === session)

        // Reported by edge-7's Node again: it leads there again (its certificate and HELLO claimed it).
        fixture.watchSays(.modified(Fixture.node("edge-7", ["10.0.0.7"])))
        #expect(registry.lookup(host: "10.0.0.7") === session)

        // A Node deleted: its addresses stop leading to its tunnel at once, before the tunnel has closed.
        fixture.watchSays(.deleted(Fixture.node("edge-7", ["10.0.0.7"])))
        #expect(registry.lookup(host: "10.0.0.7") == nil)
    }

    @Test func anAddressGivenToAnotherNodeCanBeRegisteredByThatNodesAgent() throws {
        let fixture = try Fixture(nodes: [Fixture.node("edge-7", ["10.0.0.7"]), Fixture.node("edge-8", ["10.0.0.8"])])
        let old = try #require(try fixture.register("edge-7", ips: ["10.0.0.7"]))
        fixture.watchSays(.modified(Fixture.node("edge-7", [])))
        fixture.watchSays(.modified(Fixture.node("edge-8", ["10.0.0.8", "10.0.0.7"])))
        // edge-8's agent, re-joined with the address, registers it: it is no longer held by edge-7's tunnel.
        let new = try #require(try fixture.register("edge-8", ips: ["10.0.0.8", "10.0.0.7"]))
        #expect(fixture.server.registry.lookup(host: "10.0.0.7") === new)
        // edge-7's Node reports it again meanwhile: it stays with edge-8, which holds it now.
        fixture.watchSays(.modified(Fixture.node("edge-7", ["10.0.0.7"])))
        #expect(fixture.server.registry.lookup(host: "10.0.0.7") === new)
        #expect(fixture.server.registry.lookup(host: "edge-7") === old)
    }
}
