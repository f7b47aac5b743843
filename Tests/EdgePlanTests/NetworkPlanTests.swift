import Foundation
import Testing
import TunnelPKI

@testable import EdgePlan

/// Every branch of the source document: connectivity × egress need × public API need × version band ×
/// cluster state (new, existing with EIP, existing without EIP). Expectations restate the document's rules.
@Suite struct NetworkPlanTableTests {
    struct Case: CustomStringConvertible, Sendable {
        var connectivity: Connectivity
        var egress: Bool
        var publicAPI: Bool
        var version: String
        var existing: Bool
        var hasEIP: Bool?
        var description: String {
            "\(connectivity.rawValue) egress=\(egress) public=\(publicAPI) v\(version) existing=\(existing) eip=\(hasEIP.map(String.init) ?? "-")"
        }
    }

    static let cases: [Case] = {
        var all: [Case] = []
        for connectivity in Connectivity.allCases {
            for egress in [false, true] {
                for publicAPI in [false, true] {
                    for version in ["1.18.8", "v1.20.11-aliyun.1", "1.21.3", "1.22.0", "1.30.2"] {
                        for (existing, eip) in [(false, nil), (true, true), (true, false)] as [(Bool, Bool?)] {
                            all.append(
                                Case(
                                    connectivity: connectivity, egress: egress, publicAPI: publicAPI,
                                    version: version, existing: existing, hasEIP: eip))
                        }
                    }
                }
            }
        }
        return all
    }()

    @Test(arguments: cases)
    func decisionsFollowTheDocument(_ c: Case) throws {
        var input = PlanInput(
            connectivity: c.connectivity, kubernetesVersion: try KubernetesVersion(parsing: c.version))
        input.internetEgress = c.egress
        input.publicAPIServer = c.publicAPI
        input.existingCluster = c.existing
        input.hasEIP = c.hasEIP
        input.edgeCIDRs = [try CIDR(parsing: "192.168.10.0/24")]
        let plan = try NetworkPlan(input: input)
        let privateLine = c.connectivity == .expressConnect

        // 1. SNAT only for outbound internet; EIP over the internet, or over a private line for a public API.
        #expect(plan.snat.needed == c.egress)
        let eipNeeded = !privateLine || c.publicAPI
        #expect(plan.eip.needed == eipNeeded)
        let cannotAttach = plan.findings.contains { $0.severity == .error && $0.message.contains("cannot be attached") }
        #expect(cannotAttach == (eipNeeded && c.existing && c.hasEIP == false))

        // 2. Service type and the private-line path by version.
        #expect(plan.tunnelService.type == (privateLine ? "ClusterIP" : "LoadBalancer"))
        #expect(plan.tunnelService.name == "x-tunnel-server-svc" && plan.tunnelService.namespace == "kube-system")
        let version = try KubernetesVersion(parsing: c.version)
        let expectedPath: MigrationDecision.Path
        if !privateLine {
            expectedPath = .notApplicable
        } else if version < KubernetesVersion(1, 20, 11) {
            expectedPath = .reconfigureTunnel
        } else if version >= KubernetesVersion(1, 22, 0) {
            expectedPath = .dedicatedNodePool
        } else {
            expectedPath = .upgrade
        }
        #expect(plan.privateLine.path == expectedPath)
        if expectedPath == .reconfigureTunnel {
            #expect(plan.privateLine.steps.contains { $0.contains("certIPs") && $0.contains("nothing under") })
        }

        // 3. UDP 8472 from the edge (container network on by default); TCP 10262 only over a private line.
        let rules = plan.securityGroupRules.map { "\($0.ipProtocol) \($0.portRange) \($0.sourceCidrIp)" }
        #expect(rules.contains("udp 8472/8472 192.168.10.0/24"))
        #expect(rules.contains("tcp 10262/10262 192.168.10.0/24") == privateLine)
        #expect(plan.securityGroupRules.allSatisfy { $0.command.hasPrefix("aliyun ecs AuthorizeSecurityGroup ") })
    }

    @Test func versionsAreParsedTheWayKubernetesWritesThem() throws {
        #expect(try KubernetesVersion(parsing: "v1.20.11-aliyun.1") == KubernetesVersion(1, 20, 11))
        #expect(try KubernetesVersion(parsing: "1.22") == KubernetesVersion(1, 22, 0))
        #expect(try KubernetesVersion(parsing: "1.20.10") < KubernetesVersion(1, 20, 11))
        for bad in ["", "one.two", "1", "1.2.3.4", "v1.x.3", "1..2"] {
            #expect(throws: PlanError.self) { try KubernetesVersion(parsing: bad) }
        }
    }

    @Test func contradictionsAndBadValuesAreRefused() throws {
        var input = PlanInput(connectivity: .internet, kubernetesVersion: KubernetesVersion(1, 22, 0))
        input.hasEIP = true
        #expect(throws: PlanError.self) { try NetworkPlan(input: input) }
        #expect(throws: PlanError.self) { try Connectivity(parsing: "carrier-pigeon") }
        for bad in ["10.0.0.0/33", "10.0.0/8", "banana", "10.0.0.0/-1", "fd00::/129"] {
            #expect(throws: PKIError.self) { try CIDR(parsing: bad) }
        }
    }

    @Test func withoutEdgeCIDRsTheRulesCannotBeRendered() throws {
        let plan = try NetworkPlan(
            input: PlanInput(connectivity: .expressConnect, kubernetesVersion: KubernetesVersion(1, 22, 0)))
        #expect(plan.securityGroupRules.isEmpty)
        #expect(plan.findings.contains { $0.severity == .warning && $0.message.contains("--edge-cidr") })
    }

    @Test func containerNetworkOffMeansNoVXLANRule() throws {
        var input = PlanInput(connectivity: .internet, kubernetesVersion: KubernetesVersion(1, 22, 0))
        input.cloudEdgeContainerNetwork = false
        input.edgeCIDRs = [try CIDR(parsing: "10.8.0.0/16")]
        #expect(try NetworkPlan(input: input).securityGroupRules.isEmpty)
    }
}

@Suite struct SecurityGroupTests {
    func group(_ rules: [(String, String, String, String, Int)]) throws -> SecurityGroupExport {
        let permissions = rules.map { proto, range, source, policy, priority in
            """
            {"IpProtocol": "\(proto)", "PortRange": "\(range)", "SourceCidrIp": "\(source)", "Policy": "\(policy)", \
            "Direction": "ingress", "Priority": \(priority)}
            """
        }
        let json =
            "{\"SecurityGroupId\": \"sg-test\", \"Permissions\": {\"Permission\": [\(permissions.joined(separator: ","))]}}"
        return try SecurityGroupExport.load(path: "test.json", data: Data(json.utf8))
    }

    func verdict(_ g: SecurityGroupExport, _ cidr: String) throws -> SecurityGroupVerdict {
        SecurityGroupVerdict.evaluate(g, protocol: "udp", port: 8472, from: try CIDR(parsing: cidr))
    }

    @Test func acceptRuleCoveringTheEdgeAllows() throws {
        let g = try group([("UDP", "8472/8472", "192.168.0.0/16", "Accept", 1)])
        #expect(try verdict(g, "192.168.10.0/24").allowed)
        #expect(try !verdict(g, "10.0.0.0/8").allowed)  // not covered: default deny
    }

    @Test func allPortsAndAllProtocolsCount() throws {
        #expect(try verdict(group([("ALL", "-1/-1", "0.0.0.0/0", "Accept", 100)]), "10.1.0.0/16").allowed)
        #expect(try verdict(group([("UDP", "8000/9000", "10.0.0.0/8", "Accept", 1)]), "10.1.0.0/16").allowed)
        #expect(try !verdict(group([("TCP", "8472/8472", "10.0.0.0/8", "Accept", 1)]), "10.1.0.0/16").allowed)
    }

    @Test func higherPriorityDropWinsAndEqualPriorityDropWins() throws {
        let dropFirst = try group([
            ("UDP", "8472/8472", "10.0.0.0/8", "Accept", 10), ("UDP", "8472/8472", "10.1.0.0/16", "Drop", 1),
        ])
        let result = try verdict(dropFirst, "10.1.0.0/16")
        #expect(!result.allowed && result.explanation.contains("dropped"))
        let acceptFirst = try group([
            ("UDP", "8472/8472", "10.0.0.0/8", "Accept", 1), ("UDP", "8472/8472", "10.1.0.0/16", "Drop", 10),
        ])
        #expect(try verdict(acceptFirst, "10.1.0.0/16").allowed)
        let tie = try group([
            ("UDP", "8472/8472", "10.0.0.0/8", "Accept", 5), ("ALL", "-1/-1", "10.0.0.0/8", "Drop", 5),
        ])
        #expect(try !verdict(tie, "10.1.0.0/16").allowed)
    }

    @Test func aDropOnPartOfTheEdgeNetworkFails() throws {
        let g = try group([
            ("UDP", "8472/8472", "10.0.0.0/8", "Accept", 10), ("UDP", "8472/8472", "10.1.2.0/24", "Drop", 1),
        ])
        let result = try verdict(g, "10.1.0.0/16")
        #expect(!result.allowed)
        #expect(result.explanation.contains("10.1.2.0/24"))
    }

    @Test func nestedAcceptsThatCoverTheWholeEdgeAllow() throws {
        let g = try group([
            ("UDP", "8472/8472", "10.1.0.0/17", "Accept", 1), ("UDP", "8472/8472", "10.1.128.0/17", "Accept", 1),
        ])
        #expect(try verdict(g, "10.1.0.0/16").allowed)
        let half = try group([("UDP", "8472/8472", "10.1.0.0/17", "Accept", 1)])
        #expect(try !verdict(half, "10.1.0.0/16").allowed)
    }

    @Test func egressRulesAndMalformedExportsAreHandled() throws {
        let json =
            #"{"Permissions": {"Permission": [{"IpProtocol": "UDP", "PortRange": "8472/8472", "SourceCidrIp": "0.0.0.0/0", "Policy": "Accept", "Direction": "egress", "Priority": "1"}]}}"#
        let g = try SecurityGroupExport.load(path: "x.json", data: Data(json.utf8))
        #expect(try !verdict(g, "10.0.0.0/8").allowed)
        #expect(throws: PlanError.self) { try SecurityGroupExport.load(path: "x.json", data: Data("{}".utf8)) }
    }
}

@Suite struct DoctorHostileInputTests {
    /// Found by the FuzzConfig fuzzer: Yams' untyped loader force-unwrapped non-string mapping keys.
    @Test func aServiceFileWithNonStringKeysIsRefusedNotATrap() {
        var laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        for level in 1...8 {
            laughs +=
                "l\(level): &l\(level) [\(Array(repeating: level == 1 ? "*a" : "*l\(level - 1)", count: 10).joined(separator: ", "))]\n"
        }
        for text in [
            "{[a]: 1}", "kind: Service\nspec:\n  ? [type]\n  : ClusterIP\n", String(repeating: "[", count: 200), laughs,
        ] {
            let results = Doctor.checkService(yaml: text, path: "svc.yaml", mode: .expressConnect)
            #expect(results.count == 1 && results[0].status == .fail, "\(text.prefix(40))")
        }
    }
}
