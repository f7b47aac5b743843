/// `host:port` as it appears in a CONNECT request or a Host header; IPv6 hosts in brackets.
public struct HostPort: Hashable, Sendable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// Splits `HOST:PORT` or `[IPv6]:PORT` into the host (without brackets) and the text after the colon,
    /// neither checked: the one place every `host:port` flag, rule and header is taken apart. Nil without a
    /// colon, or with a bracket not closed right before one.
    public static func split<S: StringProtocol>(_ text: S) -> (host: S.SubSequence, port: S.SubSequence)? {
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return nil }
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { return nil }
            return (text[text.index(after: text.startIndex)..<close], rest.dropFirst())
        }
        guard let colon = text.lastIndex(of: ":") else { return nil }
        return (text[..<colon], text[text.index(after: colon)...])
    }

    public init?(authority: String) {
        guard let (host, portText) = Self.split(authority) else { return nil }
        // Unbracketed, a host with a colon is an IPv6 address whose last group looks like a port.
        guard authority.hasPrefix("[") || !host.contains(":") else { return nil }
        guard !host.isEmpty, host.utf8.count <= 253, let port = Int(portText), (1...65535).contains(port),
            portText.allSatisfy(\.isNumber),
            host.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "." || $0 == "-" || $0 == ":") })
        else { return nil }
        self.host = String(host).lowercased()
        self.port = port
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}
