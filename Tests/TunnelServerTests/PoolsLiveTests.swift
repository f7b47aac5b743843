import Crypto
import Foundation
import Logging
import NIOCore
import NIOEmbedded
import NIOPosix
import Prometheus
import Testing
import TunnelPKI
import TunnelSupport
import X509

@testable import KubeAPI
@testable import TunnelServer
@testable import TunnelWire

/// A server, with Node objects or without, whose agents register over tunnels on EmbeddedChannels with a HELLO
/// that declares a pool and a path.
final class PoolsFixture {
    let folder = NSTemporaryDirectory() + "edgetunnel-pools-\(UUID().uuidString)"
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let authority: CertificateAuthority
    let server: TunnelServer
    let nodes: NodeDirectory?
    var tunnels: [EmbeddedChannel] = []

    /// `nodes`: the Node objects listed (nil: no `--node-objects`).
    init(nodes listed: [[String: any Sendable]]? = nil, poolLabel: String = PoolName.openYurtLabel) throws {
        authority = try CertificateAuthority.create()
        try authority.write(to: PKIPaths(directory: folder))
        var configuration = ServerConfiguration()
        configuration.pkiDirectory = folder
        configuration.checkNodeObjects = listed != nil
        configuration.poolLabel = poolLabel
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        server = try TunnelServer(configuration: configuration, logger: logger, group: group)
        if let listed {
            let client = try KubeClient(config: KubeConfig(host: "127.0.0.1", port: 1), group: group)
            let directory = NodeDirectory(client: client, logger: logger, poolLabel: poolLabel)
            directory.apply(.listed(listed))
            server.useNodeObjects(directory)
            nodes = directory
        } else {
            nodes = nil
        }
    }

    deinit {
        for tunnel in tunnels { _ = try? tunnel.finish() }
        try? group.syncShutdownGracefully()
        try? FileManager.default.removeItem(atPath: folder)
    }

    static func node(_ name: String, _ address: String, labels: [String: String] = [:]) -> [String: any Sendable] {
        [
            "metadata": ["name": name, "labels": labels as [String: any Sendable]] as [String: any Sendable],
            "status": ["addresses": [["type": "InternalIP", "address": address] as [String: any Sendable]]]
                as [String: any Sendable],
        ]
    }

    /// The agent of `name` (certificate for `ip`) says `hello`; the session if it registered, and what the server
    /// answered.
    func register(_ name: String, ip: String, pool: String?, path: String?) throws -> (AgentSession?, Frame?) {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let csr = try CertificateSigningRequest(
            version: .v1, subject: try DistinguishedName { CommonName(name) }, privateKey: key,
            attributes: .init(), signatureAlgorithm: .ecdsaWithSHA256)
        let certificate = try authority.signNodeCSR(
            try csr.serializeAsPEM().pemString, nodeName: name, ips: [IPAddress(ip)!])
        let tunnel = EmbeddedChannel()
        tunnels.append(tunnel)
        let mux = TunnelMux(role: .server, eventLoop: tunnel.eventLoop, limits: server.core.limits)
        try tunnel.pipeline.syncOperations.addHandler(mux)
        try tunnel.connect(to: .init(ipAddress: "192.0.2.1", port: 40000)).wait()
        let session = AgentSession(
            nodeName: name, certificate: certificate, channel: tunnel, mux: mux, server: server.core)
        mux.delegate = session
        try tunnel.writeInbound(Hello(nodeName: name, nodeIPs: [ip], pool: pool, path: path).frame())
        tunnel.embeddedEventLoop.run()
        var answer: Frame?
        while let frame = try tunnel.readOutbound(as: Frame.self) {
            if answer == nil, frame.type == .refused || frame.type == .helloOK { answer = frame }
        }
        return (server.registry.lookup(host: name) === session ? session : nil, answer)
    }

    func agent(_ name: String) -> AgentInfo? { server.agents.first { $0.nodeName == name } }

    /// The `edge_tunnel_server_pool_agents` lines of `/metrics`.
    func poolMetricLines() -> [String] {
        let text = String(decoding: server.route(.GET, "/metrics").body, as: UTF8.self)
        return text.split(separator: "\n").map(String.init).filter { $0.hasPrefix("edge_tunnel_server_pool_agents{") }
            .sorted()
    }
}

@Suite struct PoolsLiveTests {
    typealias Fixture = PoolsFixture

    @Test func withoutNodeObjectsTheAgentsDeclaredPoolAndPathAreShown() throws {
        let fixture = try Fixture()
        #expect(try fixture.register("edge-1", ip: "10.0.0.1", pool: "line-pool", path: "private").0 != nil)
        #expect(try fixture.register("edge-2", ip: "10.0.0.2", pool: "net-pool", path: "internet").0 != nil)
        // An agent from before pools: no pool, path unknown.
        #expect(try fixture.register("edge-3", ip: "10.0.0.3", pool: nil, path: nil).0 != nil)
        // A path this build does not know is shown as unknown, not refused.
        #expect(try fixture.register("edge-4", ip: "10.0.0.4", pool: "net-pool", path: "satellite").0 != nil)
        #expect(fixture.agent("edge-1")?.pool == "line-pool" && fixture.agent("edge-1")?.path == "private")
        #expect(fixture.agent("edge-2")?.pool == "net-pool" && fixture.agent("edge-2")?.path == "internet")
        #expect(fixture.agent("edge-3")?.pool == nil && fixture.agent("edge-3")?.path == "unknown")
        #expect(fixture.agent("edge-4")?.path == "unknown")
        #expect(
            fixture.poolMetricLines() == [
                #"edge_tunnel_server_pool_agents{pool="",path="unknown"} 1.0"#,
                #"edge_tunnel_server_pool_agents{pool="line-pool",path="private"} 1.0"#,
                #"edge_tunnel_server_pool_agents{pool="net-pool",path="internet"} 1.0"#,
                #"edge_tunnel_server_pool_agents{pool="net-pool",path="unknown"} 1.0"#,
            ])
        // The total stays as it was, unlabelled.
        let text = String(decoding: fixture.server.route(.GET, "/metrics").body, as: UTF8.self)
        #expect(text.contains("\nedge_tunnel_server_agents 4.0\n"))
    }

    @Test func aPoolThatIsNotADNSLabelIsRefused() throws {
        let fixture = try Fixture()
        for bad in ["Pool-A", "-a", "a_b", String(repeating: "a", count: 64), "", "a\nb"] {
            let (session, answer) = try fixture.register(
                "edge-\(bad.count)x", ip: "10.0.0.9", pool: bad, path: "private")
            #expect(session == nil)
            let refused = try answer.map { try Refused(frame: $0) }
            #expect(refused?.reason.contains("is not a DNS label") == true, "\(bad)")
        }
        #expect(
            try fixture.register("edge-ok", ip: "10.0.0.9", pool: String(repeating: "a", count: 63), path: nil).0 != nil
        )
    }

    @Test func withNodeObjectsTheNodesLabelWinsOverTheAgentsClaim() throws {
        let fixture = try Fixture(nodes: [
            Fixture.node("edge-1", "10.0.0.1", labels: [PoolName.openYurtLabel: "line-pool"]),
            Fixture.node("edge-2", "10.0.0.2", labels: [PoolName.ackLabel: "np0a1b2c3d"]),
            Fixture.node("edge-3", "10.0.0.3"),
            Fixture.node("edge-4", "10.0.0.4", labels: [PoolName.openYurtLabel: "-not a value-"]),
        ])
        // edge-1 claims another pool: registered, but shown in its Node's.
        #expect(try fixture.register("edge-1", ip: "10.0.0.1", pool: "net-pool", path: "private").0 != nil)
        #expect(try fixture.register("edge-2", ip: "10.0.0.2", pool: nil, path: "internet").0 != nil)
        // No pool label on the Node: in no pool, whatever the agent claims.
        #expect(try fixture.register("edge-3", ip: "10.0.0.3", pool: "line-pool", path: "private").0 != nil)
        #expect(try fixture.register("edge-4", ip: "10.0.0.4", pool: "line-pool", path: "private").0 != nil)
        #expect(fixture.agent("edge-1")?.pool == "line-pool")
        #expect(fixture.agent("edge-2")?.pool == "np0a1b2c3d")
        #expect(fixture.agent("edge-3")?.pool == nil)
        #expect(fixture.agent("edge-4")?.pool == nil)
        #expect(
            fixture.poolMetricLines().contains(#"edge_tunnel_server_pool_agents{pool="line-pool",path="private"} 1.0"#))
        #expect(fixture.poolMetricLines().contains(#"edge_tunnel_server_pool_agents{pool="",path="private"} 2.0"#))

        // The Node moves to another pool: seen at once, the tunnel untouched.
        fixture.nodes?.apply(
            .modified(Fixture.node("edge-1", "10.0.0.1", labels: [PoolName.openYurtLabel: "net-pool"])))
        #expect(fixture.agent("edge-1")?.pool == "net-pool")
        #expect(!fixture.poolMetricLines().contains { $0.contains(#"pool="line-pool""#) })
    }

    @Test func theConfiguredPoolLabelIsReadFirst() throws {
        let fixture = try Fixture(
            nodes: [
                Fixture.node(
                    "edge-1", "10.0.0.1", labels: ["example.com/pool": "mine", PoolName.openYurtLabel: "yurt"]),
                Fixture.node("edge-2", "10.0.0.2", labels: [PoolName.openYurtLabel: "yurt"]),
            ],
            poolLabel: "example.com/pool")
        #expect(fixture.nodes?.poolLabels == ["example.com/pool", PoolName.openYurtLabel, PoolName.ackLabel])
        #expect(fixture.nodes?.pool(of: "edge-1") == "mine")
        #expect(fixture.nodes?.pool(of: "edge-2") == "yurt")
        fixture.nodes?.apply(.deleted(Fixture.node("edge-1", "10.0.0.1")))
        #expect(fixture.nodes?.pool(of: "edge-1") == nil)
    }

    @Test func poolsBeyondSixtyFourCountAsOtherAndGiveTheirSeriesBackWhenEmpty() {
        let registry = PrometheusCollectorRegistry()
        let gauges = PoolAgentGauges(registry: registry)
        let pools = (0..<70).map { String(format: "pool-%02d", $0) }
        var agents: [(pool: String?, path: String)] = pools.map { ($0, "private") }
        agents += [("pool-00", "internet"), ("pool-69", "internet"), (nil, "unknown")]
        let counts = gauges.update(agents)
        // pool-00 ... pool-63 by name; pool-64 ... pool-69 are other.
        #expect(counts[.init(pool: "pool-00", path: "private")] == 1)
        #expect(counts[.init(pool: "pool-00", path: "internet")] == 1)
        #expect(counts[.init(pool: "pool-63", path: "private")] == 1)
        #expect(counts[.init(pool: "pool-64", path: "private")] == nil)
        #expect(counts[.init(pool: "other", path: "private")] == 6)
        #expect(counts[.init(pool: "other", path: "internet")] == 1)
        #expect(counts[.init(pool: "", path: "unknown")] == 1)
        #expect(Set(counts.keys.map(\.pool)).count == 64 + 2)

        // pool-00's agents leave: its series go, and its place goes to the first waiting pool.
        let next = gauges.update(agents.filter { $0.pool != "pool-00" })
        #expect(next[.init(pool: "pool-64", path: "private")] == 1)
        #expect(next[.init(pool: "other", path: "private")] == 5)
        var text: [UInt8] = []
        registry.emit(into: &text)
        let rendered = String(decoding: text, as: UTF8.self)
        #expect(!rendered.contains(#"pool="pool-00""#))
        #expect(rendered.contains(#"edge_tunnel_server_pool_agents{pool="pool-64",path="private"} 1.0"#))
        // A series whose agents left but whose pool still has others reads 0.
        _ = gauges.update(agents.filter { !($0.pool == "pool-69" && $0.path == "internet") && $0.pool != "pool-00" })
        text = []
        registry.emit(into: &text)
        #expect(
            String(decoding: text, as: UTF8.self).contains(
                #"edge_tunnel_server_pool_agents{pool="other",path="internet"} 0.0"#))

        // However many pools come and go, the series stay bounded.
        for round in 0..<20 {
            _ = gauges.update((0..<100).map { ("round\(round)-\($0)", $0 % 2 == 0 ? "private" : "internet") })
            #expect(gauges.seriesCount <= (PoolAgentGauges.maxPools + 2) * 3)
        }
    }
}
