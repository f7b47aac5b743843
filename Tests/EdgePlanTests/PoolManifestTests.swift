import Foundation
import Testing
import TunnelPKI

@testable import EdgePlan

@Suite struct PoolManifestTests {
    static func options(
        _ flags: [String], public publicAddress: String? = nil, line: String? = nil
    ) throws -> ManifestOptions {
        let pools = try flags.map { try EdgePool(flag: $0) }
        var o = ManifestOptions(mode: PlanInput.connectivity(of: pools))
        o.pools = pools
        o.publicAddress = publicAddress
        o.lineAddress = line
        return o
    }

    @Test func eachPoolsAddressesInOrderOfPreference() throws {
        let o = try Self.options(PoolPlanTests.mixed, public: "203.0.113.10:10262")
        try o.validatePools()
        #expect(o.serviceMode == .internet)
        #expect(
            o.serverAddresses(of: o.pools[0]) == [
                "x-tunnel-server-line-svc.kube-system.svc:10262", "203.0.113.10:10262",
            ])
        #expect(o.serverAddresses(of: o.pools[1]) == ["203.0.113.10:10262"])
        let file = o.addressesFile(of: o.pools[1])
        #expect(file.hasSuffix("#   x-tunnel-server-line-svc.kube-system.svc:10262\n203.0.113.10:10262\n"))
        #expect(file.split(separator: "\n").filter { !$0.hasPrefix("#") } == ["203.0.113.10:10262"])
        // The certificate names every pool's addresses (an IP as an IP, a name as a name), once.
        var withExtra = o
        withExtra.certIPs = ["203.0.113.10"]
        #expect(withExtra.certificateNames.ips == ["203.0.113.10"])
        #expect(withExtra.certificateNames.dnsNames == ["x-tunnel-server-line-svc.kube-system.svc"])
        var lined = try Self.options(["hz=express-connect"], line: "[fd00::1]:10262")
        lined.namespace = "edge"
        #expect(lined.certificateNames.ips == ["fd00::1"] && lined.serviceMode == .expressConnect)
        #expect(lined.defaultLineAddress == "x-tunnel-server-line-svc.edge.svc:10262")
    }

    @Test func badPoolOptionsAreRefused() throws {
        let cases: [(ManifestOptions, String)] = [
            (try Self.options(PoolPlanTests.mixed), "pool sh is internet: give --public-address"),
            (try Self.options(["hz=express-connect"], public: "a.example.com:10262"), "no pool is internet"),
            (try Self.options(PoolPlanTests.mixed, public: "nope"), "invalid --public-address \"nope\""),
            (
                try Self.options(PoolPlanTests.mixed, public: "a.example.com:10262", line: "x:0"),
                "invalid --line-address \"x:0\""
            ),
            (try Self.options([], public: "a.example.com:10262"), "give --pool too"),
            (try Self.options(["hz=express-connect"]).with { $0.serverAddresses = ["a:1"] }, "--server-address"),
            (
                try Self.options(["hz=express-connect"]).with { $0.edgeCIDRs = [try CIDR(parsing: "10.0.0.0/8")] },
                "--edge-cidr"
            ),
        ]
        for (o, needle) in cases {
            #expect(throws: PlanError.self) { try o.validatePools() }
            do { try o.validatePools() } catch { #expect("\(error)".contains(needle), "\(error)") }
        }
        try ManifestOptions(mode: .internet).validatePools()
    }

    @Test func oneDaemonSetAndConfigMapPerPoolAndBothServices() throws {
        let yaml = try Manifests.render(try Self.options(PoolPlanTests.mixed, public: "203.0.113.10:10262"))
        for name in [
            "edge-tunnel-agent-hz", "edge-tunnel-agent-sh", "edge-tunnel-pool-hz", "edge-tunnel-pool-sh",
            "x-tunnel-server-svc", "x-tunnel-server-line-svc", "x-tunnel-server-internal-svc",
        ] {
            #expect(yaml.contains("  name: \(name)\n"), "\(name)")
        }
        #expect(!yaml.contains("kind: DaemonSet\nmetadata:\n  name: edge-tunnel-agent\n"))
        #expect(yaml.components(separatedBy: "kind: DaemonSet\n").count == 3)
        #expect(yaml.contains("type: LoadBalancer"))
        #expect(yaml.contains("apps.openyurt.io/nodepool: hz") && yaml.contains("alibabacloud.com/nodepool-id: sh"))
        #expect(
            yaml.contains("certIPs: [203.0.113.10]")
                && yaml.contains("certDNSNames: [x-tunnel-server-line-svc.kube-system.svc]"))
        #expect(yaml.contains(",kube-system/x-tunnel-server-line-svc\n"))
        #expect(yaml.contains("name: edge-tunnel-bootstrap-hz") && yaml.contains("name: edge-tunnel-bootstrap-sh"))
        // Without pools: one DaemonSet, no line Service, the addresses still a watched file.
        let single = try Manifests.render(ManifestOptions(mode: .expressConnect))
        #expect(
            single.contains("kind: DaemonSet\nmetadata:\n  name: edge-tunnel-agent\n")
                && !single.contains("x-tunnel-server-line-svc"))
        #expect(single.contains("--server-addresses-file=/etc/edge-tunnel/addresses/server-addresses"))
        #expect(!single.contains("SERVER_ADDRESSES"))
    }

    @Test func theNotesCreateEachPoolsTokenWithItsNetworks() throws {
        var o = try Self.options(["hz=express-connect,cidr=10.20.0.0/16,cidr=10.21.0.0/16", "bj=express-connect"])
        let notes = Manifests.notes(o)
        #expect(
            notes.contains(
                "create secret generic edge-tunnel-bootstrap-hz --from-literal=token=\"$(kubectl -n kube-system exec "
                    + "deploy/edge-tunnel-server -- edgetunnel token create --join-state-namespace edge-tunnel --node-cidr 10.20.0.0/16 "
                    + "--node-cidr 10.21.0.0/16 --description edge-pool-hz)\""))
        #expect(
            notes.contains("# Pool bj has no cidr=")
                && notes.contains("--node-cidr POOL-CIDR --description edge-pool-bj"))
        o.joinStateClaim = "state"
        #expect(
            Manifests.notes(o).contains(
                "edgetunnel token create --pki-dir /var/lib/edge-tunnel-server/pki --node-cidr 10.20.0.0/16"))
        var single = ManifestOptions(mode: .internet)
        single.edgeCIDRs = [try CIDR(parsing: "192.168.10.0/24")]
        #expect(
            Manifests.notes(single).contains(
                "create secret generic edge-tunnel-bootstrap --from-literal=token=\"$(kubectl -n kube-system exec deploy/edge-tunnel-server -- "
                    + "edgetunnel token create --join-state-namespace edge-tunnel --node-cidr 192.168.10.0/24 --description edge-agents)\""
            ))
        #expect(Manifests.notes(ManifestOptions(mode: .internet)).contains("--node-cidr EDGE-CIDR"))
    }
}

extension ManifestOptions {
    func with(_ change: (inout ManifestOptions) throws -> Void) rethrows -> ManifestOptions {
        var copy = self
        try change(&copy)
        return copy
    }
}
