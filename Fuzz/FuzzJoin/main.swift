import Foundation
import FuzzSupport
import NIOCore
import TunnelPKI
import TunnelWire

/// libFuzzer target: arbitrary bytes as a JOIN frame's payload, through what the server does with it before
/// answering: decode the request, check the token against a stored one, the node name, the node IPs against
/// the token's networks, and sign the CSR.
let authority = try! CertificateAuthority.create()
let stored = try! JSONDecoder.iso8601.decode(
    StoredToken.self,
    from: Data(
        """
        {"id": "abcdef", "secretHash": "sha256:00", "created": "2026-01-01T00:00:00Z",
         "nodes": ["edge-*"], "nodeCIDRs": ["10.0.0.0/8", "fd00::/8"]}
        """.utf8))

extension JSONDecoder {
    static var iso8601: JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzJoin(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var payload = ByteBuffer()
    payload.writeBytes(UnsafeBufferPointer(start: data, count: size))
    guard let request = try? JoinRequest(frame: Frame(type: .join, payload: payload)) else { return 0 }
    _ = try? TokenStore.verify(request.token, among: [stored])
    let ips = (request.nodeIPs ?? []).compactMap(IPAddress.init)
    _ = stored.allows(node: request.nodeName)
    _ = try? stored.checkNodeIPs(ips)
    _ = try? StoredToken.validateNodePattern(request.nodeName)
    precondition(
        Refused(reason: "join refused: \(PeerText.bounded(request.nodeName))").frame().payload.readableBytes
            < Frame.maxUnregisteredPayload)
    _ = try? authority.signNodeCSR(request.csrPEM, nodeName: request.nodeName, ips: ips)
    return 0
}

runFuzzer { data, size in
    guard let data else { return 0 }
    return fuzzJoin(data, size)
}
