import NIOCore
import NIOHTTP1

/// Writes request parts back as bytes for the target: the head as the decoder parsed it, and the body re-framed
/// (chunked again when it came chunked; the decoder hands over the chunks' contents).
struct RequestEncoder {
    /// Whether the current request's body is chunked.
    private var chunked = false

    /// The head as the decoder parsed it: header names and order kept, lines ending in CRLF.
    mutating func write(_ head: HTTPRequestHead, into buffer: inout ByteBuffer) {
        chunked = head.headers[canonicalForm: "transfer-encoding"].last?.lowercased() == "chunked"
        buffer.writeString(head.method.rawValue)
        buffer.writeInteger(UInt8(ascii: " "))
        buffer.writeString(head.uri)
        buffer.writeString(head.version.minor == 0 ? " HTTP/1.0\r\n" : " HTTP/1.1\r\n")
        for (name, value) in head.headers {
            buffer.writeString(name)
            buffer.writeString(": ")
            buffer.writeString(value)
            buffer.writeString("\r\n")
        }
        buffer.writeString("\r\n")
    }

    /// A piece of the body, framed as its request frames it. A length-framed body is passed on as it is.
    func frame(_ body: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        guard chunked else { return body }
        var framed = allocator.buffer(capacity: body.readableBytes + 16)
        framed.writeString(String(body.readableBytes, radix: 16))
        framed.writeString("\r\n")
        framed.writeImmutableBuffer(body)
        framed.writeString("\r\n")
        return framed
    }

    /// The end of a request: the last chunk and any trailers for a chunked body, nothing otherwise.
    func end(_ trailers: HTTPHeaders?, into buffer: inout ByteBuffer) {
        guard chunked else { return }
        buffer.writeString("0\r\n")
        for (name, value) in trailers ?? [:] {
            buffer.writeString(name)
            buffer.writeString(": ")
            buffer.writeString(value)
            buffer.writeString("\r\n")
        }
        buffer.writeString("\r\n")
    }

    /// Whether llhttp stops parsing after this request: `CONNECT`, or an `Upgrade` header together with the token
    /// `upgrade` in `Connection` — exactly llhttp's rule (`llhttp__before_headers_complete`). Were we to think
    /// a request upgrades when llhttp does not, the decoder would go on parsing into a handler that takes bytes.
    static func endsHTTP(_ head: HTTPRequestHead) -> Bool {
        head.method == .CONNECT
            || head.headers.contains(name: "upgrade")
                && head.headers[canonicalForm: "connection"].contains { $0.lowercased() == "upgrade" }
    }
}
