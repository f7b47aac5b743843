import Foundation
import Logging
import NIOPosix
import Testing
import TunnelPKI

@testable import KubeAPI

/// The node records a replica follows in ConfigMaps (`--join-state-namespace`): an object that holds no valid
/// record of its node makes that node count as revoked, also on a replica that never saw the record parse.
@Suite struct KubeJoinStateTests {
    /// A join state driven with watch changes, as its watch would drive it; its client is never used.
    func followedState() throws -> KubeJoinState {
        let client = try KubeClient(
            config: KubeConfig(host: "127.0.0.1", port: 1), group: MultiThreadedEventLoopGroup.singleton)
        let state = KubeJoinState(
            client: client, namespace: "edge-tunnel", logger: Logger(label: "kube-join-state-test"))
        state.apply(.listed([]), kind: "token")
        return state
    }

    func object(of node: String, record: String, version: String = "1") -> [String: any Sendable] {
        [
            "metadata": ["name": KubeJoinState.nodeObjectName(node), "resourceVersion": version]
                as [String: any Sendable],
            "data": ["record": record] as [String: any Sendable],
        ]
    }

    func joined(_ name: String) throws -> NodeRecord {
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        return try NodeRecord.joining(nil, name: name, ips: [], certificateValidFrom: now, others: [], now: now)
    }

    @Test func anObjectWithoutAValidRecordOfItsNodeMakesTheNodeCountAsRevoked() throws {
        let state = try followedState()
        state.apply(
            .listed([
                object(of: "edge-1", record: try KubeJoinState.json(try joined("edge-1"))),
                object(of: "edge-2", record: "{not json"),
                object(of: "edge-3", record: try KubeJoinState.json(try joined("edge-4"))),  // another node's record
            ]), kind: "node")
        #expect(state.isSynced)
        #expect(state.knownRecords.map(\.name) == ["edge-1"])
        // A replica started after the edit never saw edge-2's or edge-3's record parse: they count as revoked.
        #expect(!state.hasUnreadableRecord("edge-1"))
        #expect(state.hasUnreadableRecord("edge-2"))
        #expect(state.hasUnreadableRecord("edge-3"))
        #expect(!state.hasUnreadableRecord("edge-4"))  // it has no object of its own: no record at all

        // Made unreadable after it was seen: counts as revoked; what was seen of it stays known (its IPs stay taken).
        state.apply(.modified(object(of: "edge-1", record: "{", version: "2")), kind: "node")
        #expect(state.hasUnreadableRecord("edge-1"))
        #expect(state.knownRecords.map(\.name) == ["edge-1"])
        // Fixed: it counts again.
        state.apply(
            .modified(object(of: "edge-1", record: try KubeJoinState.json(try joined("edge-1")), version: "3")),
            kind: "node")
        #expect(!state.hasUnreadableRecord("edge-1"))

        // Deleted: neither a record nor an unreadable object is left (the server refuses a node without a record).
        state.apply(.deleted(object(of: "edge-2", record: "{not json")), kind: "node")
        #expect(!state.hasUnreadableRecord("edge-2"))
        // A list again says what is there now.
        state.apply(.listed([object(of: "edge-1", record: "{", version: "4")]), kind: "node")
        #expect(state.hasUnreadableRecord("edge-1") && !state.hasUnreadableRecord("edge-3"))
        #expect(state.knownRecords.map(\.name) == ["edge-1"])
    }
}
