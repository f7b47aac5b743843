import NIOCore
import NIOHTTP1
import TunnelSupport
import TunnelWire

/// Where a caller's request goes, decided from the head NIOHTTP1's decoder (llhttp) parsed.
///
/// The decoder does the HTTP grammar, strictly: a bare CR or LF, control characters, both `Content-Length` and
/// `Transfer-Encoding` (the request-smuggling pattern), conflicting lengths and a head over ``maxHeadSize`` are
/// refused before a route is chosen (``rejection(for:)`` words them). What the grammar allows and we still
/// refuse is checked here: a second `Host`, bytes that are not UTF-8, a `Host` that is no node.
enum RequestRoute: Equatable {
    /// `CONNECT host:port`: a tunnel stream, ``ConnectHandler`` answers.
    case connect(target: String)
    /// Origin form routed by its `Host` (a node name or IP) to that node; the head goes on unchanged.
    case node(HostPort)
    /// Absolute form with the `http` scheme, as Go's HTTP client and curl send to a forward proxy: plain HTTP to
    /// the URL's host and port, with this head (origin form, hop-by-hop headers removed, `Connection: close`).
    case forward(HostPort, HTTPRequestHead)

    struct Rejection: Error, Equatable {
        var status: Int
        var reason: String
    }

    /// The largest head accepted (request line and header names and values); a longer one is answered with 431.
    static let maxHeadSize = 64 * 1024

    /// The decoder's limits: the head's size, and a header count no client we serve comes near.
    static var decoderLimits: NIOHTTPDecoderLimitConfiguration {
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderFieldSize = maxHeadSize
        limits.maxHeaderListSize = maxHeadSize
        limits.maxHeaderFieldCount = 1024
        return limits
    }

    /// The request decoder every caller's bytes go through first; after an upgrade (or `CONNECT`) it hands the
    /// bytes it did not parse to the next handler when it is removed.
    static func makeDecoder() -> ByteToMessageHandler<HTTPRequestDecoder> {
        ByteToMessageHandler(
            HTTPRequestDecoder(
                leftOverBytesStrategy: .forwardBytes, informationalResponseStrategy: .drop,
                limitConfiguration: decoderLimits))
    }

    init(_ head: HTTPRequestHead, defaultPort: Int) throws {
        try Self.check(head)
        if head.method == .CONNECT {
            self = .connect(target: head.uri)
        } else if let forward = try Self.forwardRequest(head) {
            self = .forward(forward.0, forward.1)
        } else {
            self = .node(try Self.destination(head, defaultPort: defaultPort))
        }
    }

    /// What every request on a connection must pass, the first and the ones after it: what the grammar allows
    /// but a target could read differently from us.
    static func check(_ head: HTTPRequestHead) throws {
        if head.headers["host"].count > 1 { throw Rejection(status: 400, reason: "more than one Host header") }
        // The decoder replaces bytes that are not UTF-8 with U+FFFD; forwarding that would change the request.
        if hasReplacement(head.uri)
            || head.headers.contains(where: { hasReplacement($0.name) || hasReplacement($0.value) })
        {
            throw Rejection(status: 400, reason: "request head is not valid UTF-8")
        }
        // HTTP/1.0 has no chunked coding: llhttp de-chunks such a body, Go's server (the kubelet) ignores the
        // header and would read the chunks as the next request (RFC 9112 §6.1 says to treat it as an error).
        if head.version.major == 1, head.version.minor == 0, head.headers.contains(name: "transfer-encoding") {
            throw Rejection(status: 400, reason: "Transfer-Encoding in an HTTP/1.0 request")
        }
    }

    /// Whether trailers are what we can forward unchanged.
    static func check(trailers: HTTPHeaders) throws {
        if trailers.contains(where: { hasReplacement($0.name) || hasReplacement($0.value) }) {
            throw Rejection(status: 400, reason: "request trailers are not valid UTF-8")
        }
    }

    private static func hasReplacement(_ text: String) -> Bool {
        // U+FFFD is EF BF BD in UTF-8; the byte 0xEF is rare in heads, so this is one pass over the bytes.
        text.utf8.contains(0xEF) && text.unicodeScalars.contains("\u{FFFD}")
    }

    /// The request's node: its `Host` header, with `defaultPort` if it names none.
    private static func destination(_ head: HTTPRequestHead, defaultPort: Int) throws -> HostPort {
        var authority = head.headers.first(name: "host")
        if head.uri.hasPrefix("https://") {
            // Absolute form with another scheme: its authority wins over Host (RFC 9112 §3.2.2).
            let parts = head.uri.split(separator: "/", maxSplits: 3, omittingEmptySubsequences: false)
            if parts.count >= 3 { authority = String(parts[2]) }
        }
        guard let authority, !authority.isEmpty else {
            throw Rejection(status: 400, reason: "request has no Host header: cannot tell which node it is for")
        }
        return try hostPort(authority, defaultPort: defaultPort)
    }

    /// `host[:port]` with `defaultPort` when the port is missing; a 400 naming the authority otherwise.
    private static func hostPort(_ authority: String, defaultPort: Int) throws -> HostPort {
        if let hostPort = HostPort(authority: authority) { return hostPort }
        if let hostPort = HostPort(authority: "\(authority):\(defaultPort)"),
            !authority.contains(":") || authority.hasPrefix("[") && authority.hasSuffix("]")
        {
            return hostPort
        }
        throw Rejection(
            status: 400,
            reason: "Host \"\(PeerText.bounded(authority))\" is not a node name or IP with an optional port")
    }

    /// Headers that concern one connection only (RFC 9110 §7.6.1), never forwarded; `Host` is set anew from the
    /// URL. `Transfer-Encoding` stays: the body is re-framed as it came.
    private static let hopByHop: Set<String> = [
        "connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te", "trailer",
        "upgrade", "host",
    ]

    /// For a request in absolute form with the `http` scheme (`GET http://edge-7:9100/metrics HTTP/1.1`): where
    /// it goes (port 80 by default) and the head to send there. Nil for any other form.
    private static func forwardRequest(_ head: HTTPRequestHead) throws -> (HostPort, HTTPRequestHead)? {
        let target = head.uri
        guard target.utf8.count > 7, target.prefix(7).lowercased() == "http://" else { return nil }
        let rest = target.dropFirst(7)
        let pathStart = rest.firstIndex { $0 == "/" || $0 == "?" } ?? rest.endIndex
        let authority = String(rest[..<pathStart])
        guard !authority.contains("@") else {
            throw Rejection(status: 400, reason: "a URL with credentials is not forwarded")
        }
        let destination = try hostPort(authority, defaultPort: 80)
        var path = String(rest[pathStart...])
        if !path.hasPrefix("/") { path = "/" + path }
        let named = Set(head.headers[canonicalForm: "connection"].map { $0.lowercased() })
        // Headers that frame the body or name the target cannot be hop-by-hop: dropping them would unframe it.
        if let framing = named.first(where: { ["content-length", "transfer-encoding", "host"].contains($0) }) {
            throw Rejection(status: 400, reason: "Connection names \(framing), which cannot be removed when forwarding")
        }
        var headers = HTTPHeaders()
        headers.add(name: "Host", value: authority)
        for (name, value) in head.headers {
            let lower = name.lowercased()
            guard !hopByHop.contains(lower), !named.contains(lower) else { continue }
            headers.add(name: name, value: value)
        }
        headers.add(name: "Connection", value: "close")
        return (destination, HTTPRequestHead(version: head.version, method: head.method, uri: path, headers: headers))
    }

    /// The one-line answer to a head the decoder refused.
    static func rejection(for error: any Error) -> Rejection {
        guard let error = error as? HTTPParserError else {
            return Rejection(status: 400, reason: "malformed request head: \(error)")
        }
        switch error {
        case .headerOverflow:
            return Rejection(
                status: 431,
                reason: "request header block is larger than \(maxHeadSize / 1024) KiB or has more than 1,024 headers")
        case .unexpectedContentLength:
            return Rejection(
                status: 400,
                reason:
                    "Content-Length with Transfer-Encoding, or two Content-Length headers: refused (request smuggling)")
        case .invalidContentLength:
            return Rejection(status: 400, reason: "malformed Content-Length")
        case .invalidHeaderToken, .invalidCharactersUsed, .strictModeAssertion:
            return Rejection(status: 400, reason: "control character or malformed header line in the request head")
        case .lfExpected:
            return Rejection(status: 400, reason: "a line of the request head does not end in CRLF (control character)")
        case .invalidVersion, .invalidMethod, .invalidURL, .invalidConstant:
            return Rejection(status: 400, reason: "malformed request line")
        default:
            // llhttp's other refusals reach us as "unknown": the ones a request meets are these.
            return Rejection(
                status: 400,
                reason: "malformed request head: a bare CR or LF, Transfer-Encoding with Content-Length (request "
                    + "smuggling) or another break of RFC 9112")
        }
    }
}
