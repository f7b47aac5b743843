import Foundation
import Testing
import TunnelPKI

@testable import TunnelServer

/// Node records kept in Kubernetes objects (`--join-state-namespace`) fail closed: a node is accepted only with a
/// readable record of its own that is not revoked. (With `nodes.json`, names without a record are still accepted:
/// ``AdmissionTests``.)
@Suite struct ExternalNodeRecordsTests {
    func withIdentities(_ body: (NodeIdentities) throws -> Void) throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("external-nodes-\(UUID())").path
        defer { try? FileManager.default.removeItem(atPath: folder) }
        try body(try NodeIdentities(paths: PKIPaths(directory: folder)))
    }

    static let issued = Date().addingTimeInterval(-60)

    func joined(_ name: String) throws -> NodeRecord {
        try NodeRecord.joining(
            nil, name: name, ips: [], certificateValidFrom: Self.issued, others: [], now: Self.issued)
    }

    @Test func aRevokedNodeWhoseRecordIsDeletedStaysRefused() throws {
        try withIdentities { identities in
            let revoked = NodeRecord.revoked(try joined("edge-2"), name: "edge-2", now: Self.issued)
            identities.replace([try joined("edge-1"), revoked], synced: true)
            #expect(identities.accepts(node: "edge-1", certificateValidFrom: Self.issued))
            #expect(!identities.accepts(node: "edge-2", certificateValidFrom: Self.issued))
            // edge-2's object deleted (a GitOps prune, a restore from an older backup): no record, no tunnel.
            identities.replace([try joined("edge-1")], synced: true)
            #expect(!identities.accepts(node: "edge-2", certificateValidFrom: Self.issued))
            #expect(!identities.accepts(node: "edge-3", certificateValidFrom: Self.issued))  // never joined
            #expect(identities.expectedNodes == ["edge-1"])
        }
    }

    @Test func aNodeWhoseRecordObjectDoesNotParseCountsAsRevoked() throws {
        try withIdentities { identities in
            // edge-1's record was seen before its object was made unreadable; edge-2's never was.
            identities.replace(
                [try joined("edge-1"), try joined("edge-4")], synced: true,
                unreadable: { ["edge-1", "edge-2"].contains($0) })
            #expect(!identities.accepts(node: "edge-1", certificateValidFrom: Self.issued))
            #expect(!identities.accepts(node: "edge-2", certificateValidFrom: Self.issued))
            #expect(identities.accepts(node: "edge-4", certificateValidFrom: Self.issued))
            #expect(identities.expectedNodes == ["edge-4"])
        }
    }
}
