import Foundation
import TunnelSupport
import TunnelWire

/// The head of an HTTP/1.1 request, parsed just enough to route it: method, target, headers.
///
/// Strict on purpose: a request is refused (4xx) rather than guessed at when it is ambiguous — both
/// `Content-Length` and `Transfer-Encoding` (the request-smuggling pattern), conflicting lengths, obsolete
/// line folding, or a head over the size limit.
struct RequestHead: Equatable {
    var method: String
    var target: String
    var version: String
    var headers: [(name: String, value: String)]

    static func == (lhs: RequestHead, rhs: RequestHead) -> Bool {
        lhs.method == rhs.method && lhs.target == rhs.target && lhs.version == rhs.version
            && lhs.headers.map(\.name) == rhs.headers.map(\.name) && lhs.headers.map(\.value) == rhs.headers.map(\.value)
    }

    struct Rejection: Error, Equatable {
        var status: Int
        var reason: String
    }

    /// The largest head accepted; a longer one is answered with 431.
    static let maxSize = 64 * 1024

    /// Where the head ends in `bytes` (just past the blank line), or nil if it has not ended yet.
    static func end(in bytes: some Collection<UInt8>) -> Int? {
        var matched = 0
        var index = 0
        for byte in bytes {
            index += 1
            switch (matched, byte) {
            case (0, 13), (2, 13): matched += 1
            case (1, 10): matched = 2
            case (3, 10): return index
            case (_, 13): matched = 1
            default: matched = 0
            }
        }
        return nil
    }

    init(parsing bytes: some Collection<UInt8>) throws {
        // Lines end at CRLF, as in the HTTP grammar; split on bytes (splitting a String on "\r\n" would run
        // grapheme breaking over every byte, a visible cost at thousands of CONNECTs a second).
        let raw = Array(bytes)
        var ranges: [Range<Int>] = []
        var start = 0
        var index = 0
        while index + 1 < raw.count {
            if raw[index] == 13 && raw[index + 1] == 10 {
                ranges.append(start..<index)
                index += 2
                start = index
            } else {
                index += 1
            }
        }
        if start < raw.count { ranges.append(start..<raw.count) }
        var lines = try ranges.map { range in
            // A bare CR or LF, NUL or another control character (HTAB aside) is refused (RFC 9112 §2.2): a
            // lone LF would end a line for the target's parser and smuggle a header past ours.
            guard !raw[range].contains(where: { ($0 < 0x20 && $0 != 0x09) || $0 == 0x7f }) else {
                throw Rejection(status: 400, reason: "control character in the request head")
            }
            guard let line = String(validating: raw[range], as: UTF8.self) else {
                throw Rejection(status: 400, reason: "request head is not valid UTF-8")
            }
            return line
        }
        while lines.last == "" { lines.removeLast() }
        guard let requestLine = lines.first else { throw Rejection(status: 400, reason: "empty request") }
        let parts = requestLine.split(separator: " ", omittingEmptySubsequences: false)
        guard parts.count == 3, !parts[0].isEmpty, !parts[1].isEmpty, parts[2].hasPrefix("HTTP/1.") else {
            throw Rejection(status: 400, reason: "malformed request line")
        }
        method = String(parts[0])
        target = String(parts[1])
        version = String(parts[2])
        headers = []
        for line in lines.dropFirst() {
            guard let first = line.first, first != " " && first != "\t" else {
                throw Rejection(status: 400, reason: "obsolete header line folding is not accepted")
            }
            guard let colon = line.firstIndex(of: ":") else { throw Rejection(status: 400, reason: "malformed header line") }
            let name = String(line[..<colon])
            guard !name.isEmpty, !name.contains(" ") else { throw Rejection(status: 400, reason: "malformed header name") }
            let value = line[line.index(after: colon)...].drop { $0 == " " || $0 == "\t" }
            headers.append((name, String(value.reversed().drop { $0 == " " || $0 == "\t" }.reversed())))
        }
        let lengths = Set(values("Content-Length"))
        if !values("Transfer-Encoding").isEmpty && !lengths.isEmpty {
            throw Rejection(status: 400, reason: "both Content-Length and Transfer-Encoding: refused (request smuggling)")
        }
        if lengths.count > 1 { throw Rejection(status: 400, reason: "conflicting Content-Length headers") }
        if let length = lengths.first, UInt64(length) == nil {
            throw Rejection(status: 400, reason: "malformed Content-Length")
        }
        if values("Host").count > 1 { throw Rejection(status: 400, reason: "more than one Host header") }
    }

    func values(_ name: String) -> [String] {
        headers.filter { $0.name.utf8.count == name.utf8.count && $0.name.lowercased() == name.lowercased() }.map(\.value)
    }

    /// The routing destination: the `Host` header (or an absolute-form target), with `defaultPort` if none.
    func destination(defaultPort: Int) throws -> HostPort {
        var authority = values("Host").first
        if target.hasPrefix("http://") || target.hasPrefix("https://") {
            let rest = target.split(separator: "/", maxSplits: 3, omittingEmptySubsequences: false)
            if rest.count >= 3 { authority = String(rest[2]) }
        }
        guard let authority, !authority.isEmpty else {
            throw Rejection(status: 400, reason: "request has no Host header: cannot tell which node it is for")
        }
        return try Self.hostPort(authority, defaultPort: defaultPort)
    }

    /// `host[:port]` with `defaultPort` when the port is missing; a 400 naming the authority otherwise.
    private static func hostPort(_ authority: String, defaultPort: Int) throws -> HostPort {
        if let hostPort = HostPort(authority: authority) { return hostPort }
        if let hostPort = HostPort(authority: "\(authority):\(defaultPort)"),
            !authority.contains(":") || authority.hasPrefix("[") && authority.hasSuffix("]")
        {
            return hostPort
        }
        throw Rejection(status: 400, reason: "Host \"\(PeerText.bounded(authority))\" is not a node name or IP with an optional port")
    }

    /// A forward-proxy request for an `http://` URL, as the target must receive it.
    struct ForwardRequest: Equatable {
        var destination: HostPort
        /// The head in origin form, hop-by-hop headers removed, `Connection: close`, ending in the blank line.
        var head: String
    }

    /// Headers that concern one connection only (RFC 9110 §7.6.1), never forwarded; `Host` is set anew from
    /// the URL. `Transfer-Encoding` stays: the body is passed on unchanged and it frames it.
    private static let hopByHop: Set<String> = [
        "connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te", "trailer",
        "upgrade", "host",
    ]

    /// For a request in absolute form with the `http` scheme (`GET http://edge-7:9100/metrics HTTP/1.1`): where
    /// it goes (port 80 by default) and the head to send there. Nil for any other form.
    func forwardProxyRequest() throws -> ForwardRequest? {
        guard target.utf8.count > 7, target.prefix(7).lowercased() == "http://" else { return nil }
        let rest = target.dropFirst(7)
        let pathStart = rest.firstIndex { $0 == "/" || $0 == "?" } ?? rest.endIndex
        let authority = String(rest[..<pathStart])
        guard !authority.contains("@") else {
            throw Rejection(status: 400, reason: "a URL with credentials is not forwarded")
        }
        let destination = try Self.hostPort(authority, defaultPort: 80)
        var path = String(rest[pathStart...])
        if !path.hasPrefix("/") { path = "/" + path }
        let named = Set(values("Connection").flatMap { $0.split(separator: ",") }.map {
            $0.trimmingCharacters(in: .whitespaces).lowercased()
        })
        var head = "\(method) \(path) \(version)\r\nHost: \(authority)\r\n"
        for (name, value) in headers {
            let lower = name.lowercased()
            guard !Self.hopByHop.contains(lower), !named.contains(lower) else { continue }
            head += "\(name): \(value)\r\n"
        }
        head += "Connection: close\r\n\r\n"
        return ForwardRequest(destination: destination, head: head)
    }
}
