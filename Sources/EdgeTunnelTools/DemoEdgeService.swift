import NIOCore
import NIOHTTP1
import NIOPosix
import TunnelSupport

/// A tiny HTTP service standing in for an edge node's kubelet in the demo: answers every GET with a greeting.
public enum DemoEdgeService {
    public static func bind(host: String, port: Int, nodeName: String, group: EventLoopGroup) async throws -> Channel {
        try await MetaHTTPServer.bind(host: host, port: port, group: group) { _, path in
            .text(.ok, "hello from edge node \(nodeName) (path \(path)), reached through EdgeTunnel")
        }
    }
}
