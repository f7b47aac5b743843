import NIOCore
import NIOHTTP1

/// The server's path for a caller's request head, as one call: the route it names and the head encoded again for
/// the target. Public for `edgetunnel bench heads` (EdgeTunnelTools), which times it against NIOHTTP1's decoder.
public struct RequestHeadPath {
    private var encoder = RequestEncoder()

    public init() {}

    /// The decoder the server reads callers' heads with.
    public static func makeDecoder() -> ByteToMessageHandler<HTTPRequestDecoder> { RequestRoute.makeDecoder() }

    /// Routes `head` as the server does and writes it, encoded again, into `out`. Returns the port of the node
    /// it names (0 for any other route).
    public mutating func handle(_ head: HTTPRequestHead, into out: inout ByteBuffer) throws -> Int {
        var port = 0
        if case .node(let destination) = try RequestRoute(head, defaultPort: 10250) { port = destination.port }
        encoder.write(head, into: &out)
        return port
    }
}
