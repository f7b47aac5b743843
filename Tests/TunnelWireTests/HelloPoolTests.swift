import Foundation
import NIOCore
import Testing

@testable import TunnelWire

/// HELLO's `pool` and `path` (issue 26): optional JSON fields, absent from older agents' HELLOs and absent from the
/// JSON when not set, so that a HELLO without them is byte for byte what it was.
@Suite struct HelloPoolTests {
    func json(_ hello: Hello) throws -> [String: Any] {
        let frame = hello.frame()
        return try #require(
            try JSONSerialization.jsonObject(with: Data(frame.payload.readableBytesView)) as? [String: Any])
    }

    @Test func aHelloWithPoolAndPathRoundTrips() throws {
        let hello = Hello(nodeName: "edge-1", nodeIPs: ["10.0.0.1"], pool: "line-pool", path: "private")
        let object = try json(hello)
        #expect(object["pool"] as? String == "line-pool")
        #expect(object["path"] as? String == "private")
        let decoded = try Hello(frame: hello.frame())
        #expect(decoded == hello)
        #expect(decoded.pool == "line-pool" && decoded.path == "private")
    }

    @Test func aHelloWithoutThemLeavesThemOut() throws {
        let hello = Hello(nodeName: "edge-1", nodeIPs: ["10.0.0.1"])
        let object = try json(hello)
        #expect(object["pool"] == nil && object["path"] == nil)
        #expect(Set(object.keys) == ["version", "nodeName", "nodeIPs", "capabilities"])
        let decoded = try Hello(frame: hello.frame())
        #expect(decoded.pool == nil && decoded.path == nil)
    }

    @Test func anOlderAgentsHelloDecodesWithNeither() throws {
        let older = #"{"version":3,"nodeName":"edge-1","nodeIPs":["10.0.0.1"],"capabilities":[],"resumeTokens":["ab"]}"#
        let decoded = try Hello(frame: Frame(type: .hello, payload: ByteBuffer(string: older)))
        #expect(decoded.nodeName == "edge-1" && decoded.resumeTokens == ["ab"])
        #expect(decoded.pool == nil && decoded.path == nil)
    }

    @Test func aPoolOfTheWrongTypeIsAMalformedHello() {
        let bad = #"{"version":3,"nodeName":"edge-1","nodeIPs":[],"capabilities":[],"pool":7}"#
        #expect(throws: FrameError.self) { try Hello(frame: Frame(type: .hello, payload: ByteBuffer(string: bad))) }
    }
}
