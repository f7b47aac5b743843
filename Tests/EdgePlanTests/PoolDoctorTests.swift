import Foundation
import Testing
import TunnelSupport

@testable import EdgePlan

/// `edgetunnel doctor --pool NAME --expect PATH` on a server's agent list.
@Suite struct PoolDoctorTests {
    func agent(_ name: String, pool: String?, path: String?) -> AgentInfo {
        AgentInfo(
            nodeName: name, nodeIPs: [], connectedSince: Date(), remoteAddress: "", streams: 0, bytesFromAgent: 0,
            bytesToAgent: 0, pool: pool, path: path)
    }

    var agents: [AgentInfo] {
        [
            agent("edge-2", pool: "a", path: "private"), agent("edge-1", pool: "a", path: "private"),
            agent("edge-3", pool: "b", path: "internet"), agent("edge-4", pool: "c", path: "internet"),
            agent("edge-5", pool: "c", path: nil), agent("edge-6", pool: "c", path: "private"),
        ]
    }

    @Test func aPoolAllOnTheExpectedPathPasses() {
        let result = Doctor.checkPool("a", expected: .private, agents: agents, server: "server s1")
        #expect(result.status == .pass)
        #expect(result.message.contains("all 2 agent(s)") && result.message.contains("edge-1, edge-2"))
    }

    @Test func agentsOnAnotherPathAreNamed() {
        let result = Doctor.checkPool("a", expected: .internet, agents: agents, server: "server s1")
        #expect(result.status == .fail)
        #expect(result.message.contains("2 of 2") && result.message.contains("edge-1 (private), edge-2 (private)"))
        #expect(result.fix?.contains("public address") == true)
        let mixed = Doctor.checkPool("c", expected: .internet, agents: agents, server: "server s1")
        #expect(mixed.status == .fail)
        #expect(mixed.message.contains("2 of 3") && mixed.message.contains("edge-5 (unknown), edge-6 (private)"))
        #expect(!mixed.message.contains("edge-4"))
        #expect(mixed.fix?.contains("upgrade") == true)
    }

    @Test func aPoolWithoutAgentsFails() {
        let result = Doctor.checkPool("z", expected: .private, agents: agents, server: "server s1")
        #expect(result.status == .fail && result.message.contains("no agent of pool z"))
    }

    @Test func aLongListIsBounded() {
        let many = (0..<80).map { agent("edge-\($0)", pool: "a", path: "internet") }
        let result = Doctor.checkPool("a", expected: .private, agents: many, server: "server s1")
        #expect(result.message.hasSuffix("and 30 more"))
    }
}
