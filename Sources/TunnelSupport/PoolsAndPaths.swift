import TunnelPKI
import TunnelWire

// The words of "pools seen live" (issue 26), shared by the agent that declares them at HELLO, the server that
// reports them (`/v1/agents`, `/metrics`) and the CLI (`edgetunnel status`, `doctor --pool`).

/// How an agent's tunnel reaches the server: over the private line (Express Connect) or over the internet.
public enum TunnelPath: String, Codable, Sendable, CaseIterable {
    case `private`
    case internet

    /// What is shown for a path an agent did not report (agents before HELLO's `path`) or reported in words
    /// this build does not know.
    public static let unknown = "unknown"

    /// `text` as reported in HELLO: `private`, `internet`, or ``unknown``.
    public static func shown(_ text: String?) -> String {
        text.flatMap(TunnelPath.init(rawValue:))?.rawValue ?? unknown
    }
}

/// Edge node pool names and the Node labels that carry them.
public enum PoolName {
    /// OpenYurt's node-pool label: the server's default `--pool-label`.
    public static let openYurtLabel = "apps.openyurt.io/nodepool"
    /// ACK's node-pool id label: read when a Node lacks the configured key.
    public static let ackLabel = "alibabacloud.com/nodepool-id"
    /// The longest pool name an agent may declare (a DNS label).
    public static let maxLength = 63

    /// Whether `name` may be declared by an agent: a DNS label (RFC 1123: 1-63 lower-case letters, digits and '-',
    /// starting and ending alphanumeric).
    public static func isValid(_ name: String) -> Bool {
        let utf8 = name.utf8
        guard (1...maxLength).contains(utf8.count) else { return false }
        guard utf8.allSatisfy({ isLowerAlphanumeric($0) || $0 == UInt8(ascii: "-") }) else { return false }
        return isLowerAlphanumeric(utf8.first!) && isLowerAlphanumeric(utf8.last!)
    }

    /// Checks a declared pool name, or throws an error that names `what` (the flag).
    public static func validate(_ name: String, what: String) throws -> String {
        guard isValid(name) else {
            throw ConfigurationError(
                "invalid \(what) \"\(PeerText.bounded(name, limit: 80))\": a pool name is a DNS label (1-63 lower-case letters, digits and '-')"
            )
        }
        return name
    }

    /// Whether `value` is a Kubernetes label value that names a pool: 1-63 letters, digits, '-', '_' and '.',
    /// starting and ending alphanumeric. (A Node's label is the operator's; a value outside this is ignored.)
    public static func isLabelValue(_ value: String) -> Bool {
        let utf8 = value.utf8
        guard (1...63).contains(utf8.count) else { return false }
        func alphanumeric(_ byte: UInt8) -> Bool {
            isLowerAlphanumeric(byte) || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
        }
        guard
            utf8.allSatisfy({
                alphanumeric($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".")
            })
        else { return false }
        return alphanumeric(utf8.first!) && alphanumeric(utf8.last!)
    }

    /// Whether `key` is a Kubernetes label key: an optional DNS-subdomain prefix and '/', then a name of 1-63
    /// letters, digits, '-', '_' and '.' that starts and ends alphanumeric.
    public static func isLabelKey(_ key: String) -> Bool {
        let parts = key.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let name = parts.last else { return false }
        if parts.count == 2 { guard DNSName.isValid(String(parts[0])) else { return false } }
        return isLabelValue(String(name))
    }

    private static func isLowerAlphanumeric(_ byte: UInt8) -> Bool {
        (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
            || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
    }
}
