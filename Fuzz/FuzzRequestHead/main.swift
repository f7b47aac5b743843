import FuzzSupport
import TunnelWire

@testable import TunnelServer

/// libFuzzer target: arbitrary bytes as the head of a caller's request on 10263, 10264 or the Unix socket:
/// where it ends, how it parses, where it routes, and the origin-form head a forward-proxy request becomes.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzRequestHead(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = UnsafeBufferPointer(start: data, count: size)
    let end = RequestHead.end(in: bytes) ?? bytes.count
    guard let head = try? RequestHead(parsing: bytes.prefix(end)) else { return 0 }
    _ = try? head.destination(defaultPort: 10250)
    if let forward = try? head.forwardProxyRequest() {
        // The rewritten head must itself be a head we accept, for the same destination.
        let again = try! RequestHead(parsing: Array(forward.head.utf8))
        precondition(try! again.destination(defaultPort: 80) == forward.destination, "forwarded head changed destination")
    }
    _ = PeerText.bounded(head.target)
    return 0
}

runFuzzer { data, size in
    guard let data else { return 0 }
    return fuzzRequestHead(data, size)
}
