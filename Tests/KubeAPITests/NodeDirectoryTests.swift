import Logging
import NIOPosix
import Testing

@testable import KubeAPI

/// The Node objects as the server follows them: a change of a Node's addresses is reported (the server then checks
/// again which addresses lead to its tunnel), the many status updates that leave them as they were are not.
@Suite struct NodeDirectoryTests {
    /// A directory driven with watch changes, as its watch would drive it; its client is never used.
    static func directory() throws -> NodeDirectory {
        let client = try KubeClient(
            config: KubeConfig(host: "127.0.0.1", port: 1), group: MultiThreadedEventLoopGroup.singleton)
        return NodeDirectory(client: client, logger: Logger(label: "node-directory-test"))
    }

    static func node(_ name: String, _ addresses: [String]) -> [String: any Sendable] {
        [
            "metadata": ["name": name] as [String: any Sendable],
            "status": [
                "addresses": addresses.map { ["type": "InternalIP", "address": $0] as [String: any Sendable] }
            ] as [String: any Sendable],
        ]
    }

    @Test func aChangeOfANodesAddressesIsReportedAndAnUpdateThatKeepsThemIsNot() throws {
        let directory = try Self.directory()
        #expect(
            directory.apply(.listed([Self.node("edge-1", ["10.0.0.1"]), Self.node("edge-2", ["10.0.0.2"])]))
                == NodeDirectory.Update(changed: ["edge-1", "edge-2"], deleted: []))
        #expect(directory.isLoaded)
        // A heartbeat, a condition, a label: the addresses stay, nothing to check again.
        #expect(directory.apply(.modified(Self.node("edge-1", ["10.0.0.1"]))) == NodeDirectory.Update())
        // 10.0.0.1 removed from edge-1.
        #expect(
            directory.apply(.modified(Self.node("edge-1", ["10.0.0.11"])))
                == NodeDirectory.Update(changed: ["edge-1"], deleted: []))
        #expect(directory.addresses(of: "edge-1") == ["10.0.0.11"])
        // A list again (after 410 Gone): edge-2's 10.0.0.2 given to a new Node edge-3, edge-1 gone.
        #expect(
            directory.apply(.listed([Self.node("edge-2", []), Self.node("edge-3", ["10.0.0.2"])]))
                == NodeDirectory.Update(changed: ["edge-2", "edge-3"], deleted: ["edge-1"]))
        #expect(directory.addresses(of: "edge-1") == nil)
        #expect(
            directory.apply(.deleted(Self.node("edge-3", ["10.0.0.2"])))
                == NodeDirectory.Update(changed: [], deleted: ["edge-3"]))
    }
}
