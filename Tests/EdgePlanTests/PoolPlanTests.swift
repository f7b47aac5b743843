import Foundation
import Testing
import TunnelPKI

@testable import EdgePlan

/// Edge node pools: parsing from flags and from the plan file (every bad input named), the plan's per-pool
/// decisions, the version rules at every boundary, and what the manifests render per pool.
@Suite struct PoolParsingTests {
    @Test func aFlagGivesNameConnectivityCIDRsAndTheOpenYurtSelector() throws {
        let pool = try EdgePool(flag: "hz=express-connect,cidr=10.20.0.0/16,cidr=10.21.0.0/16")
        #expect(pool.name == "hz" && pool.connectivity == .expressConnect)
        #expect(pool.cidrs == [try CIDR(parsing: "10.20.0.0/16"), try CIDR(parsing: "10.21.0.0/16")])
        #expect(pool.nodeSelector == ["apps.openyurt.io/nodepool": "hz"])
        #expect(
            try EdgePool(flag: "np1a2b=internet,selector-style=ack").nodeSelector == [
                "alibabacloud.com/nodepool-id": "np1a2b"
            ])
        #expect(try EdgePool(flag: "sh=INTERNET,selector=site=shanghai").nodeSelector == ["site": "shanghai"])
        #expect(try EdgePool(flag: "sh=internet,selector=example.com/site=").nodeSelector == ["example.com/site": ""])
        #expect(try EdgePool(flag: "sh=internet").cidrs.isEmpty)
        // A repeated network is kept once.
        #expect(try EdgePool(flag: "sh=internet,cidr=10.0.0.0/8,cidr=10.0.0.0/8").cidrs.count == 1)
    }

    static let badFlags: [(String, String)] = [
        ("", "NAME=express-connect"),
        ("hz", "NAME=express-connect"),
        ("Hz=internet", "pool Hz: name \"Hz\""),
        ("-hz=internet", "pool -hz: name"),
        ("h.z=internet", "pool h.z: name"),
        (String(repeating: "a", count: 41) + "=internet", "at most 40"),
        ("=internet", "name \"\""),
        ("hz=satellite", "pool hz: connectivity \"satellite\""),
        ("hz=internet,cidr=10.0.0.0/33", "pool hz: cidr \"10.0.0.0/33\""),
        ("hz=internet,cidr=", "pool hz: cidr \"\""),
        ("hz=internet,cidr", "pool hz: \"cidr\" is not key=value"),
        ("hz=internet,", "pool hz: \"\" is not key=value"),
        ("hz=internet,colour=red", "pool hz: unknown key \"colour\""),
        ("hz=internet,selector=novalue", "pool hz: selector \"novalue\" is not KEY=VALUE"),
        ("hz=internet,selector==v", "pool hz: selector label key \"\""),
        ("hz=internet,selector=a/b/c=v", "pool hz: selector label key \"a/b/c\""),
        ("hz=internet,selector=Bad_Domain/k=v", "pool hz: selector label key"),
        ("hz=internet,selector=k=-v", "pool hz: selector value \"-v\""),
        ("hz=internet,selector=k=" + String(repeating: "v", count: 64), "pool hz: selector value"),
        ("hz=internet,selector=k=a,selector=k=b", "pool hz: selector k is given twice"),
        ("hz=internet,selector-style=k8s", "pool hz: selector-style \"k8s\""),
        ("hz=internet,selector=a=b,selector-style=ack", "pool hz: selector and selector-style both given"),
        ("hz=internet,selector-style=ack,selector=a=b", "pool hz: selector and selector-style both given"),
    ]

    @Test(arguments: badFlags)
    func eachBadFlagIsOneLineNamingThePoolAndTheKey(_ flag: String, _ needle: String) {
        do {
            _ = try EdgePool(flag: flag)
            Issue.record("accepted \(flag)")
        } catch let error as PlanError {
            #expect(error.description.hasPrefix("invalid --pool "), "\(error)")
            #expect(error.description.contains(needle), "\(error)")
            #expect(!error.description.contains("\n"))
        } catch {
            Issue.record("unexpected \(error)")
        }
    }

    @Test func poolsAreDistinctByNameAndSelector() throws {
        let a = try EdgePool(flag: "a=internet")
        #expect(throws: PlanError("pool a: the name is given twice")) { try EdgePool.validate([a, a]) }
        let b = try EdgePool(flag: "b=internet,selector=apps.openyurt.io/nodepool=a")
        #expect(throws: PlanError.self) { try EdgePool.validate([a, b]) }
        try EdgePool.validate([a, try EdgePool(flag: "b=internet")])
        let many = try (0...EdgePool.maxPools).map { try EdgePool(flag: "p\($0)=internet") }
        #expect(throws: PlanError.self) { try EdgePool.validate(many) }
    }

    @Test func thePlanFileReadsPoolsWithTheFlagsMeaning() throws {
        let text = """
            kubernetesVersion: 1.24.6
            pools:
              - name: hz
                connectivity: express-connect
                cidrs: [10.20.0.0/16, 10.21.0.0/16]
              - name: 123
                connectivity: internet
                cidrs: 192.168.30.0/24
                nodeSelector: {alibabacloud.com/is-edge-worker: true, site: sh}
              - name: np9
                connectivity: Internet
                selectorStyle: ack
            """
        let file = try PlanFile.parse(text, path: "plan.yaml")
        #expect(file.kubernetesVersion == "1.24.6")
        #expect(
            file.pools == [
                try EdgePool(flag: "hz=express-connect,cidr=10.20.0.0/16,cidr=10.21.0.0/16"),
                // YAML's true and 123 are label text here, as Kubernetes reads them.
                EdgePool(
                    name: "123", connectivity: .internet, cidrs: [try CIDR(parsing: "192.168.30.0/24")],
                    nodeSelector: ["alibabacloud.com/is-edge-worker": "true", "site": "sh"]),
                try EdgePool(flag: "np9=internet,selector-style=ack"),
            ])
        #expect(try PlanFile.parse("connectivity: internet\n", path: "p.yaml").pools == nil)
    }

    static let badFiles: [(String, String)] = [
        ("pools: hz", "plan.yaml: pools must be a list"),
        ("pools: {hz: internet}", "plan.yaml: pools must be a list"),
        ("pools: [hz]", "plan.yaml: pools[0]: expected a mapping"),
        ("pools: [{connectivity: internet}]", "plan.yaml: pools[0]: name is missing"),
        ("pools: [{name: [hz], connectivity: internet}]", "pools[0]: name must be a string"),
        ("pools: [{name: Hz, connectivity: internet}]", "pools[0] (pool Hz): name \"Hz\""),
        ("pools: [{name: hz}]", "pools[0] (pool hz): connectivity is missing"),
        ("pools: [{name: hz, connectivity: [internet]}]", "pools[0] (pool hz): connectivity must be a string"),
        ("pools: [{name: hz, connectivity: satellite}]", "pools[0] (pool hz): connectivity \"satellite\""),
        (
            "pools: [{name: hz, connectivity: internet, cidrs: [10.0.0.0/8, nope]}]",
            "pools[0] (pool hz): cidrs \"nope\""
        ),
        ("pools: [{name: hz, connectivity: internet, cidrs: {a: b}}]", "pools[0] (pool hz): cidrs must be a list"),
        (
            "pools: [{name: hz, connectivity: internet, cidrs: [[10.0.0.0/8]]}]",
            "pools[0] (pool hz): cidrs must be a list"
        ),
        (
            "pools: [{name: hz, connectivity: internet, nodeSelector: a=b}]",
            "pools[0] (pool hz): nodeSelector must be a mapping"
        ),
        (
            "pools: [{name: hz, connectivity: internet, nodeSelector: {}}]",
            "pools[0] (pool hz): nodeSelector must be a mapping"
        ),
        (
            "pools: [{name: hz, connectivity: internet, nodeSelector: {k: [v]}}]",
            "pools[0] (pool hz): nodeSelector must map"
        ),
        (
            "pools: [{name: hz, connectivity: internet, nodeSelector: {'a b': v}}]",
            "pools[0] (pool hz): nodeSelector label key \"a b\""
        ),
        (
            "pools: [{name: hz, connectivity: internet, nodeSelector: {k: 'a b'}}]",
            "pools[0] (pool hz): nodeSelector value \"a b\""
        ),
        (
            "pools: [{name: hz, connectivity: internet, selectorStyle: k8s}]",
            "pools[0] (pool hz): selectorStyle \"k8s\""
        ),
        (
            "pools: [{name: hz, connectivity: internet, selectorStyle: ack, nodeSelector: {k: v}}]",
            "nodeSelector and selectorStyle both given"
        ),
        ("pools: [{name: hz, connectivity: internet, zone: a}]", "pools[0] (pool hz): unknown key \"zone\""),
        (
            "pools: [{name: hz, connectivity: internet}, {name: hz, connectivity: internet}]",
            "plan.yaml: pool hz: the name is given twice"
        ),
        (
            "pools: [{name: a, connectivity: internet, nodeSelector: {s: x}}, {name: b, connectivity: internet, nodeSelector: {s: x}}]",
            "pools a and b have the same node selector s=x"
        ),
        ("pools: [{name: a, connectivity: internet}]\n? [x]\n: 1\n", "plan.yaml: not a plan input file"),
    ]

    @Test(arguments: badFiles)
    func eachBadPoolInTheFileIsOneLineNamingTheFileThePoolAndTheKey(_ text: String, _ needle: String) {
        do {
            _ = try PlanFile.parse(text, path: "plan.yaml")
            Issue.record("accepted \(text)")
        } catch let error as PlanError {
            #expect(error.description.hasPrefix("plan.yaml: "), "\(error)")
            #expect(error.description.contains(needle), "\(error)")
            #expect(!error.description.contains("\n"))
        } catch {
            Issue.record("unexpected \(error)")
        }
    }

    @Test func tooManyPoolsInTheFileAreRefused() {
        let text = "pools:\n" + (0...EdgePool.maxPools).map { "  - {name: p\($0), connectivity: internet}\n" }.joined()
        #expect(throws: PlanError.self) { try PlanFile.parse(text, path: "plan.yaml") }
    }
}

@Suite struct PoolPlanTests {
    static func plan(
        _ version: String, _ flags: [String], configure: (inout PlanInput) -> Void = { _ in }
    ) throws -> NetworkPlan {
        var input = PlanInput(
            pools: try flags.map { try EdgePool(flag: $0) }, kubernetesVersion: try KubernetesVersion(parsing: version))
        configure(&input)
        return try NetworkPlan(input: input)
    }

    static let mixed = ["hz=express-connect,cidr=10.20.0.0/16", "sh=internet,cidr=192.168.30.0/24,selector-style=ack"]

    @Test func eachPoolGetsItsServersAndItsRules() throws {
        let plan = try Self.plan("1.24.6", Self.mixed)
        let pools = try #require(plan.pools)
        #expect(pools.map(\.name) == ["hz", "sh"])
        #expect(pools[0].servers.map(\.service) == ["x-tunnel-server-line-svc", "x-tunnel-server-svc"])
        #expect(pools[0].servers.map(\.path) == ["private-line", "internet"])
        #expect(
            pools[1].servers.map(\.service) == ["x-tunnel-server-svc"] && pools[1].servers[0].type == "LoadBalancer")
        let rules = { (pool: PoolDecision) in
            pool.securityGroupRules.map { "\($0.ipProtocol) \($0.portRange) \($0.sourceCidrIp)" }
        }
        #expect(rules(pools[0]) == ["udp 8472/8472 10.20.0.0/16", "tcp 10262/10262 10.20.0.0/16"])
        #expect(rules(pools[1]) == ["udp 8472/8472 192.168.30.0/24"])
        #expect(plan.securityGroupRules == pools.flatMap(\.securityGroupRules))
        #expect(pools[0].securityGroupRules[1].description.contains("pool hz"))
        // The cluster as a whole: an internet pool needs the public load balancer and an EIP; SNAT only for egress.
        #expect(plan.tunnelService.type == "LoadBalancer" && plan.eip.needed && !plan.snat.needed)
        #expect(plan.eip.reason.contains("pool sh"))
        #expect(plan.lineService?.name == "x-tunnel-server-line-svc" && plan.lineService?.type == "ClusterIP")
        #expect(plan.input.connectivity == .internet)
        #expect(plan.input.edgeCIDRs.map(\.description) == ["10.20.0.0/16", "192.168.30.0/24"])
        #expect(plan.exitCode == 0)
        #expect(
            plan.text.contains("Pools:")
                && plan.text.contains("  sh (internet): 192.168.30.0/24; nodes alibabacloud.com/nodepool-id=sh"))
    }

    @Test func privateLinePoolsAloneNeedNoPublicPath() throws {
        let plan = try Self.plan(
            "1.24.6", ["hz=express-connect,cidr=10.20.0.0/16", "bj=express-connect,cidr=10.30.0.0/16"])
        #expect(plan.input.connectivity == .expressConnect)
        #expect(plan.tunnelService.type == "ClusterIP" && !plan.eip.needed)
        #expect(plan.pools?.allSatisfy { $0.servers.map(\.service) == ["x-tunnel-server-line-svc"] } == true)
        #expect(plan.privateLine.steps[0].contains("pools hz and bj as dedicated edge node pools"))
        let egress = try Self.plan("1.24.6", ["hz=express-connect"]) {
            $0.internetEgress = true
            $0.publicAPIServer = true
        }
        #expect(egress.snat.needed && egress.eip.needed)
    }

    @Test func internetPoolsAloneAreTheInternetCluster() throws {
        let plan = try Self.plan("1.20.11", ["sh=internet,cidr=192.168.30.0/24"])
        #expect(plan.privateLine.path == .notApplicable && plan.lineService == nil)
        #expect(plan.tunnelService.type == "LoadBalancer" && plan.exitCode == 0)
    }

    @Test func warningsForPoolsWithoutNetworksAndOverlappingPools() throws {
        let plan = try Self.plan(
            "1.24.6", ["a=internet", "b=internet,cidr=10.0.0.0/8", "c=express-connect,cidr=10.20.0.0/16"])
        let warnings = plan.findings.filter { $0.severity == .warning }.map(\.message)
        #expect(warnings.contains { $0.hasPrefix("pool a has no CIDR") && $0.contains("bootstrap token") })
        #expect(warnings.contains { $0.hasPrefix("pools b and c overlap (10.0.0.0/8 and 10.20.0.0/16)") })
        #expect(plan.exitCode == 0)
    }

    @Test func containerNetworkOffLeavesOnlyTheTunnelRule() throws {
        let plan = try Self.plan("1.24.6", Self.mixed) { $0.cloudEdgeContainerNetwork = false }
        #expect(plan.securityGroupRules.map { "\($0.ipProtocol) \($0.sourceCidrIp)" } == ["tcp 10.20.0.0/16"])
        #expect(plan.pools?[1].securityGroupRules.isEmpty == true)
    }

    @Test func aGivenConnectivityMustAgreeWithThePools() throws {
        #expect(throws: PlanError.self) { try Self.plan("1.24.6", Self.mixed) { $0.connectivity = .expressConnect } }
        #expect(throws: PlanError.self) {
            try Self.plan("1.24.6", ["hz=express-connect"]) { $0.connectivity = .internet }
        }
        #expect(throws: PlanError.self) { try Self.plan("1.24.6", ["a=internet", "a=express-connect"]) }
        var empty = PlanInput(connectivity: .internet, kubernetesVersion: KubernetesVersion(1, 24, 6))
        empty.pools = []
        #expect(throws: PlanError.self) { try NetworkPlan(input: empty) }
    }

    struct Boundary: CustomStringConvertible, Sendable {
        var version: String
        /// Exit codes for a mixed cluster and for one with private-line pools only.
        var mixed: Int32
        var lineOnly: Int32
        var path: MigrationDecision.Path
        var description: String { version }
    }

    /// Every line the source document draws, just below, at and above it.
    static let boundaries: [Boundary] = [
        Boundary(version: "1.16.9", mixed: 1, lineOnly: 0, path: .reconfigureTunnel),
        Boundary(version: "1.20.10", mixed: 1, lineOnly: 0, path: .reconfigureTunnel),
        Boundary(version: "v1.20.10-aliyun.1", mixed: 1, lineOnly: 0, path: .reconfigureTunnel),
        Boundary(version: "1.20.11", mixed: 1, lineOnly: 1, path: .upgrade),
        Boundary(version: "v1.20.11-aliyun.1", mixed: 1, lineOnly: 1, path: .upgrade),
        Boundary(version: "1.20.12", mixed: 1, lineOnly: 1, path: .upgrade),
        Boundary(version: "1.21.0", mixed: 1, lineOnly: 1, path: .upgrade),
        Boundary(version: "1.21.14", mixed: 1, lineOnly: 1, path: .upgrade),
        Boundary(version: "1.22", mixed: 0, lineOnly: 0, path: .dedicatedNodePool),
        Boundary(version: "1.22.0", mixed: 0, lineOnly: 0, path: .dedicatedNodePool),
        Boundary(version: "v1.22.15-aliyun.1", mixed: 0, lineOnly: 0, path: .dedicatedNodePool),
        Boundary(version: "1.30.2", mixed: 0, lineOnly: 0, path: .dedicatedNodePool),
    ]

    @Test(arguments: boundaries)
    func versionRulesPerPool(_ b: Boundary) throws {
        let mixed = try Self.plan(b.version, Self.mixed)
        #expect(mixed.privateLine.path == b.path)
        #expect(mixed.exitCode == b.mixed)
        let errors = mixed.findings.filter { $0.severity == .error }.map(\.message)
        switch b.path {
        case .reconfigureTunnel:
            #expect(
                errors.count == 1
                    && errors[0].contains("pool hz (express-connect) and pool sh (internet) cannot be mixed"))
        case .upgrade:
            #expect(errors.count == 1 && errors[0].hasPrefix("pool hz is express-connect, but Kubernetes"))
            // With pools the version's contradiction is the pool's error, not the cluster's generic warning.
            #expect(
                !mixed.findings.contains { $0.severity == .warning && $0.message.contains("between 1.20.11 and 1.22") })
        default:
            #expect(errors.isEmpty)
        }
        let lineOnly = try Self.plan(
            b.version, ["hz=express-connect,cidr=10.20.0.0/16", "bj=express-connect,cidr=10.30.0.0/16"])
        #expect(lineOnly.exitCode == b.lineOnly)
        if b.path == .upgrade {
            #expect(lineOnly.findings.filter { $0.severity == .error }.count == 2)  // one per pool, each named
        }
        if b.path == .reconfigureTunnel {
            #expect(lineOnly.privateLine.steps.last?.contains("edge-tunnel-pool-NAME") == true)
        }
        // Internet pools never contradict a version.
        #expect(try Self.plan(b.version, ["sh=internet,cidr=192.168.30.0/24"]).exitCode == 0)
    }

    @Test func anErrorFindingMakesExitCodeOne() throws {
        var input = PlanInput(connectivity: .expressConnect, kubernetesVersion: KubernetesVersion(1, 24, 6))
        input.publicAPIServer = true
        input.existingCluster = true
        input.hasEIP = false
        #expect(try NetworkPlan(input: input).exitCode == 1)
        input.hasEIP = true
        #expect(try NetworkPlan(input: input).exitCode == 0)
        // Warnings alone (here: no edge CIDR, a version with no documented route) keep 0.
        let warned = try NetworkPlan(
            input: PlanInput(connectivity: .expressConnect, kubernetesVersion: KubernetesVersion(1, 21, 3)))
        #expect(warned.findings.contains { $0.severity == .warning } && warned.exitCode == 0)
    }

    @Test func withoutPoolsTheJSONHasNoPoolKeys() throws {
        let plan = try NetworkPlan(
            input: PlanInput(connectivity: .internet, kubernetesVersion: KubernetesVersion(1, 24, 6)))
        let json = String(decoding: try JSONEncoder().encode(plan), as: UTF8.self)
        #expect(!json.contains("\"pools\"") && !json.contains("\"lineService\""))
    }
}
