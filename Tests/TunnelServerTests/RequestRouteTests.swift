import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing
import TunnelSupport

@testable import TunnelServer

/// The request-head path every caller on 10263, 10264 and the Unix socket goes through: NIOHTTP1's decoder with
/// our limits, the route, and the bytes written on to the target.
@Suite struct RequestRouteTests {
    enum Outcome {
        case parts([HTTPServerRequestPart])
        case refused(RequestRoute.Rejection)
    }

    /// Feeds `bytes` to the server's decoder in reads of `chunk` bytes; the parts, or the answer a refusal gets.
    func decode(_ bytes: [UInt8], chunk: Int = .max) throws -> Outcome {
        let channel = EmbeddedChannel(handler: RequestRoute.makeDecoder())
        defer { _ = try? channel.finish() }
        var parts: [HTTPServerRequestPart] = []
        var offset = 0
        do {
            while offset < bytes.count {
                let end = min(bytes.count, offset + chunk)
                try channel.writeInbound(channel.allocator.buffer(bytes: bytes[offset..<end]))
                offset = end
                while let part = try channel.readInbound(as: HTTPServerRequestPart.self) { parts.append(part) }
            }
        } catch {
            return .refused(RequestRoute.rejection(for: error))
        }
        return .parts(parts)
    }

    func head(_ text: String) throws -> HTTPRequestHead {
        guard case .parts(let parts) = try decode(Array(text.utf8)), case .head(let head) = parts.first else {
            throw RequestRoute.Rejection(status: 0, reason: "no head decoded from \(text.debugDescription)")
        }
        return head
    }

    func route(_ text: String, defaultPort: Int = 10250) throws -> RequestRoute {
        try RequestRoute(try head(text), defaultPort: defaultPort)
    }

    /// The refusal `text` gets, from the decoder or from the route.
    func refusal(_ text: String) throws -> RequestRoute.Rejection? {
        switch try decode(Array(text.utf8)) {
        case .refused(let rejection):
            return rejection
        case .parts(let parts):
            guard case .head(let head) = parts.first else { return nil }
            do {
                _ = try RequestRoute(head, defaultPort: 10250)
                return nil
            } catch let rejection as RequestRoute.Rejection {
                return rejection
            }
        }
    }

    @Test func connectOriginAndAbsoluteForms() throws {
        #expect(
            try route("CONNECT edge-1:10250 HTTP/1.1\r\nHost: edge-1:10250\r\n\r\n") == .connect(target: "edge-1:10250")
        )
        #expect(try route("GET /pods HTTP/1.1\r\nHost: edge-1\r\n\r\n") == .node(HostPort(host: "edge-1", port: 10250)))
        #expect(
            try route("GET / HTTP/1.1\r\nHost: [fd00::7]\r\n\r\n", defaultPort: 10255)
                == .node(HostPort(host: "fd00::7", port: 10255)))
        #expect(
            try route("GET https://edge-2:10250/pods HTTP/1.1\r\nHost: edge-1\r\n\r\n")
                == .node(HostPort(host: "edge-2", port: 10250)))
    }

    @Test func aHeadSplitIntoOneByteReadsDecodesAsInOne() throws {
        let text = Array("POST /exec HTTP/1.1\r\nHost: edge-1:10250\r\nContent-Length: 4\r\n\r\nbody".utf8)
        guard case .parts(let whole) = try decode(text), case .parts(let split) = try decode(text, chunk: 1) else {
            Issue.record("refused")
            return
        }
        #expect(whole.first == split.first)
        func body(_ parts: [HTTPServerRequestPart]) -> String {
            parts.compactMap { if case .body(let buffer) = $0 { String(buffer: buffer) } else { nil } }.joined()
        }
        #expect(body(whole) == "body" && body(split) == "body")
        #expect(whole.last == .end(nil) && split.last == .end(nil))
    }

    @Test func aForwardProxyRequestBecomesOriginFormWithoutHopByHopHeaders() throws {
        let request = try route(
            "GET http://edge-7:9100/metrics?x=1 HTTP/1.1\r\nHost: edge-7:9100\r\nProxy-Connection: keep-alive\r\n"
                + "Proxy-Authorization: Basic eA==\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n"
                + "TE: trailers\r\nUpgrade: h2c\r\nAccept: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        guard case .forward(let destination, let head) = request else {
            Issue.record("not forwarded: \(request)")
            return
        }
        #expect(destination == HostPort(host: "edge-7", port: 9100))
        var encoder = RequestEncoder()
        var bytes = ByteBuffer()
        encoder.write(head, into: &bytes)
        #expect(
            String(buffer: bytes) == "GET /metrics?x=1 HTTP/1.1\r\nHost: edge-7:9100\r\nAccept: text/plain\r\n"
                + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        guard case .forward(let bare, let bareHead) = try route("GET http://edge-7?q HTTP/1.1\r\n\r\n") else {
            Issue.record("not forwarded")
            return
        }
        #expect(bare == HostPort(host: "edge-7", port: 80) && bareHead.uri == "/?q")
        #expect(try refusal("GET http://user:pw@edge-7/ HTTP/1.1\r\n\r\n")?.status == 400)
    }

    @Test func aChunkedBodyIsChunkedAgainForTheTargetWithItsTrailers() throws {
        let text =
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\n"
        guard case .parts(let parts) = try decode(Array(text.utf8)) else {
            Issue.record("refused")
            return
        }
        var encoder = RequestEncoder()
        var out = ByteBuffer()
        for part in parts {
            switch part {
            case .head(let head): encoder.write(head, into: &out)
            case .body(let body):
                var framed = encoder.frame(body, allocator: ByteBufferAllocator())
                out.writeBuffer(&framed)
            case .end(let trailers): encoder.end(trailers, into: &out)
            }
        }
        // Re-decoded, the target reads the same body and trailers (the decoder may split chunks differently).
        guard case .parts(let again) = try decode(Array(out.readableBytesView)) else {
            Issue.record("our own encoding was refused: \(String(buffer: out).debugDescription)")
            return
        }
        func body(_ parts: [HTTPServerRequestPart]) -> String {
            parts.compactMap { if case .body(let buffer) = $0 { String(buffer: buffer) } else { nil } }.joined()
        }
        #expect(body(again) == "abc0123456789abcdef" && body(parts) == body(again))
        #expect(again.last == .end(["X-T": "1"]))
    }

    @Test func ambiguousHeadsAreRefusedWithAReason() throws {
        let cases: [(String, String)] = [
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                "request smuggling"
            ),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "request smuggling"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host"),
            ("GET / HTTP/1.1\r\nNoColon\r\n\r\n", "header"),
            ("GET / SPDY/3\r\n\r\n", "request line"),
            ("GET http://edge-7/ HTTP/1.1\r\nX-A: 1\nTransfer-Encoding: chunked\r\n\r\n", "bare CR or LF"),
            ("GET /\u{0}x HTTP/1.1\r\nHost: a\r\n\r\n", "request line"),
            ("GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", "CRLF"),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\u{1}b\r\n\r\n", "control character"),
        ]
        for (text, words) in cases {
            let rejection = try refusal(text)
            #expect(rejection?.status == 400, "\(text.debugDescription)")
            #expect(
                rejection?.reason.contains(words) == true,
                "\(text.debugDescription): \(rejection?.reason ?? "accepted")")
        }
        var invalidUTF8 = Array("GET / HTTP/1.1\r\nHost: a\r\nX: ".utf8)
        invalidUTF8 += [0xff, 0xfe, 13, 10, 13, 10]
        guard case .parts(let parts) = try decode(invalidUTF8), case .head(let head) = parts.first else {
            Issue.record("obs-text is HTTP; the decoder should pass it")
            return
        }
        #expect(throws: RequestRoute.Rejection(status: 400, reason: "request head is not valid UTF-8")) {
            try RequestRoute(head, defaultPort: 10250)
        }
    }

    @Test func aHeadOverTheLimitGets431InOneReadAndInMany() throws {
        let text = Array(
            ("GET / HTTP/1.1\r\nHost: a\r\nX: " + String(repeating: "x", count: RequestRoute.maxHeadSize) + "\r\n\r\n")
                .utf8)
        for chunk in [Int.max, 1000] {
            guard case .refused(let rejection) = try decode(text, chunk: chunk) else {
                Issue.record("a head over 64 KiB was accepted (reads of \(chunk))")
                continue
            }
            #expect(rejection.status == 431)
        }
        let under =
            "GET / HTTP/1.1\r\nHost: a\r\nX: " + String(repeating: "x", count: RequestRoute.maxHeadSize - 100)
            + "\r\n\r\n"
        #expect(try route(under) == .node(HostPort(host: "a", port: 10250)))
    }

    @Test func aHostThatIsNoNodeIsRefusedAndNotEchoedInFull() throws {
        let long = String(repeating: "x", count: 5000) + "!"
        let rejection = try refusal("GET / HTTP/1.1\r\nHost: \(long)\r\n\r\n")
        #expect(rejection?.status == 400 && rejection!.reason.utf8.count < 400)
        #expect(try refusal("GET / HTTP/1.1\r\n\r\n")?.reason.contains("no Host header") == true)
    }

    @Test func upgradesAndConnectEndTheHTTPPartExactlyWhenLlhttpStops() throws {
        #expect(
            RequestEncoder.endsHTTP(
                try head("GET /exec HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")))
        #expect(
            RequestEncoder.endsHTTP(
                try head("GET /exec HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, upgrade\r\nUpgrade: x\r\n\r\n")))
        #expect(RequestEncoder.endsHTTP(try head("CONNECT a:1 HTTP/1.1\r\n\r\n")))
        #expect(!RequestEncoder.endsHTTP(try head("GET /pods HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")))
        // One of the two alone is no upgrade for llhttp, which goes on parsing: neither must it be for us (a
        // decoder removed while llhttp parses on would hand request parts to a handler that takes bytes).
        #expect(!RequestEncoder.endsHTTP(try head("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: x\r\n\r\n")))
        #expect(!RequestEncoder.endsHTTP(try head("GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n")))
        guard
            case .parts(let parts) = try decode(
                Array(
                    "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n".utf8))
        else {
            Issue.record("refused")
            return
        }
        #expect(parts.filter { if case .head = $0 { true } else { false } }.count == 2)
    }

    @Test func whatATargetCouldReadDifferentlyIsRefused() throws {
        #expect(
            try refusal("POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")?.reason
                == "Transfer-Encoding in an HTTP/1.0 request")
        for name in ["Content-Length", "Transfer-Encoding", "Host"] {
            let text = "POST http://edge-7/ HTTP/1.1\r\nConnection: \(name)\r\nContent-Length: 3\r\n\r\nabc"
            #expect(try refusal(text)?.reason.contains("cannot be removed when forwarding") == true, "\(name)")
        }
    }
}
