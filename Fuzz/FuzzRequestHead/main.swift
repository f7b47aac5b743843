import FuzzSupport
import NIOCore
import NIOEmbedded
import NIOHTTP1
import TunnelWire

@testable import TunnelServer

/// libFuzzer target: arbitrary bytes as what a caller sends on 10263, 10264 or the Unix socket, through the
/// server's head path: NIOHTTP1's decoder with our limits, the route, and the request encoded again for the
/// target — which must decode to the same head and body.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzRequestHead(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = UnsafeBufferPointer(start: data, count: size)
    let parts = decode(Array(bytes))
    guard case .head(let head) = parts.first, let route = try? RequestRoute(head, defaultPort: 10250) else { return 0 }
    var sent = head
    if case .forward(_, let rewritten) = route { sent = rewritten }
    if case .connect = route { return 0 }
    // What the target reads must be what we decoded: re-encode the first request, decode it again.
    var encoder = RequestEncoder()
    var out = ByteBuffer()
    var body = ByteBuffer()
    encoder.write(sent, into: &out)
    for part in parts.dropFirst() {
        if case .body(var piece) = part {
            body.writeImmutableBuffer(piece)
            var framed = encoder.frame(piece, allocator: ByteBufferAllocator())
            out.writeBuffer(&framed)
            piece.clear()
        } else if case .end(let trailers) = part {
            encoder.end(trailers, into: &out)
            break
        } else {
            return 0
        }
    }
    let again = decode(Array(out.readableBytesView))
    guard case .head(let head2) = again.first else { preconditionFailure("our encoding of a head did not decode") }
    precondition(head2.method == sent.method && head2.uri == sent.uri, "re-encoded head changed")
    precondition(Array(head2.headers.map(\.name)) == Array(sent.headers.map(\.name)), "re-encoded headers changed")
    var body2 = ByteBuffer()
    for case .body(let piece) in again { body2.writeImmutableBuffer(piece) }
    precondition(body2 == body, "re-encoded body changed")
    return 0
}

private func decode(_ bytes: [UInt8]) -> [HTTPServerRequestPart] {
    let channel = EmbeddedChannel(handler: RequestRoute.makeDecoder())
    defer { _ = try? channel.finish() }
    var parts: [HTTPServerRequestPart] = []
    do {
        try channel.writeInbound(channel.allocator.buffer(bytes: bytes))
        while let part = try channel.readInbound(as: HTTPServerRequestPart.self) { parts.append(part) }
    } catch {
        _ = RequestRoute.rejection(for: error)
    }
    return parts
}

runFuzzer { data, size in
    guard let data else { return 0 }
    return fuzzRequestHead(data, size)
}
