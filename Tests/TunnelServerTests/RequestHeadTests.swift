import Testing
import TunnelSupport

@testable import TunnelServer

/// The request-head path every caller on 10263, 10264 and the Unix socket goes through.
@Suite struct RequestHeadTests {
    func head(_ text: String) throws -> RequestHead { try RequestHead(parsing: Array(text.utf8)) }

    func rejection(_ text: String) -> RequestHead.Rejection? {
        do {
            _ = try head(text)
            return nil
        } catch let rejection as RequestHead.Rejection {
            return rejection
        } catch {
            return RequestHead.Rejection(status: 0, reason: "\(error)")
        }
    }

    @Test func theEndIsJustPastTheBlankLineWhereverTheReadsSplitIt() {
        let text = Array("GET / HTTP/1.1\r\nHost: a\r\n\r\nbody".utf8)
        #expect(RequestHead.end(in: text) == text.count - 4)
        #expect(RequestHead.end(in: text.prefix(25)) == nil)
        #expect(RequestHead.end(in: Array("GET / HTTP/1.1\r\n\n\r\n".utf8)) == nil)  // a bare LF is not a CRLF
    }

    @Test func connectOriginAndAbsoluteForms() throws {
        let connect = try head("CONNECT edge-1:10250 HTTP/1.1\r\nHost: edge-1:10250\r\n\r\n")
        #expect(connect.method == "CONNECT" && connect.target == "edge-1:10250")
        let origin = try head("GET /pods HTTP/1.1\r\nHost: edge-1\r\n\r\n")
        #expect(try origin.destination(defaultPort: 10250) == HostPort(host: "edge-1", port: 10250))
        #expect(try origin.forwardProxyRequest() == nil)
        let v6 = try head("GET / HTTP/1.1\r\nHost: [fd00::7]\r\n\r\n")
        #expect(try v6.destination(defaultPort: 10255) == HostPort(host: "fd00::7", port: 10255))
    }

    @Test func aForwardProxyRequestBecomesOriginFormWithoutHopByHopHeaders() throws {
        let request = try head(
            "GET http://edge-7:9100/metrics?x=1 HTTP/1.1\r\nHost: edge-7:9100\r\nProxy-Connection: keep-alive\r\n"
                + "Proxy-Authorization: Basic eA==\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n"
                + "TE: trailers\r\nUpgrade: h2c\r\nAccept: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        let forward = try #require(try request.forwardProxyRequest())
        #expect(forward.destination == HostPort(host: "edge-7", port: 9100))
        #expect(forward.head == "GET /metrics?x=1 HTTP/1.1\r\nHost: edge-7:9100\r\nAccept: text/plain\r\n"
            + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        let bare = try #require(try head("GET http://edge-7?q HTTP/1.1\r\n\r\n").forwardProxyRequest())
        #expect(bare.destination == HostPort(host: "edge-7", port: 80))
        #expect(bare.head.hasPrefix("GET /?q HTTP/1.1\r\nHost: edge-7\r\n"))
        #expect(rejectionOf { try head("GET http://user:pw@edge-7/ HTTP/1.1\r\n\r\n").forwardProxyRequest() }?.status == 400)
    }

    func rejectionOf(_ body: () throws -> Any?) -> RequestHead.Rejection? {
        do {
            _ = try body()
            return nil
        } catch {
            return error as? RequestHead.Rejection
        }
    }

    @Test func ambiguousHeadsAreRefusedWithAReason() {
        let cases: [(String, String)] = [
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "request smuggling"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "conflicting Content-Length"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", "malformed Content-Length"),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host"),
            ("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "folding"),
            ("GET / HTTP/1.1\r\nNoColon\r\n\r\n", "malformed header line"),
            ("GET /  HTTP/1.1\r\n\r\n", "malformed request line"),
            ("GET / SPDY/3\r\n\r\n", "malformed request line"),
            ("GET http://edge-7/ HTTP/1.1\r\nX-A: 1\nTransfer-Encoding: chunked\r\n\r\n", "control character"),
            ("GET /\u{0}x HTTP/1.1\r\nHost: a\r\n\r\n", "control character"),
            ("GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", "control character"),
        ]
        for (text, words) in cases {
            let rejection = rejection(text)
            #expect(rejection?.status == 400, "\(text.debugDescription)")
            #expect(rejection?.reason.contains(words) == true, "\(rejection?.reason ?? "accepted")")
        }
        var invalidUTF8 = Array("GET / HTTP/1.1\r\nX: ".utf8)
        invalidUTF8 += [0xff, 0xfe, 13, 10, 13, 10]
        #expect(throws: RequestHead.Rejection.self) { try RequestHead(parsing: invalidUTF8) }
    }

    @Test func aHostThatIsNoNodeIsRefusedAndNotEchoedInFull() throws {
        let long = String(repeating: "x", count: 5000) + "!"
        let request = try head("GET / HTTP/1.1\r\nHost: \(long)\r\n\r\n")
        let rejection = rejectionOf { try request.destination(defaultPort: 10250) }
        #expect(rejection?.status == 400 && rejection!.reason.utf8.count < 400)
        #expect(rejectionOf { try head("GET / HTTP/1.1\r\n\r\n").destination(defaultPort: 10250) }?.status == 400)
    }
}
