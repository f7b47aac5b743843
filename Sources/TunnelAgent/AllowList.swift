import TunnelPKI
import TunnelSupport

/// The destinations an agent will dial for the cloud. Anything else is refused at the edge, so the tunnel is
/// no open door into the edge network.
///
/// Rules: `host:port`, `IP:port`, `CIDR:port`, and each with a port range `lo-hi`; IPv6 in brackets
/// (`[fd00::/8]:10250`). Host names match exactly (lower case) and are the only targets the agent resolves.
public struct AllowList: Sendable, CustomStringConvertible {
    public struct Rule: Sendable, Hashable, CustomStringConvertible {
        enum Match: Sendable, Hashable {
            case network(IPAddress, prefix: Int)
            case name(String)
        }
        let match: Match
        let ports: ClosedRange<Int>

        public var description: String {
            let portText = ports.count == 1 ? "\(ports.lowerBound)" : "\(ports.lowerBound)-\(ports.upperBound)"
            switch match {
            case .network(let address, let prefix):
                let full = prefix == address.bytes.count * 8
                let base = full ? address.description : "\(address)/\(prefix)"
                return address.isIPv4 ? "\(base):\(portText)" : "[\(base)]:\(portText)"
            case .name(let name):
                return "\(name):\(portText)"
            }
        }

        /// Parses one rule, or throws an error that names it.
        public init(parsing text: String) throws {
            func invalid(_ why: String) -> ConfigurationError {
                ConfigurationError("invalid allow rule \"\(text)\": \(why)")
            }
            guard let (hostPart, portPart) = HostPort.split(text) else {
                throw invalid(text.hasPrefix("[") ? "expected [IPv6 or CIDR]:port" : "expected host:port")
            }
            let bounds = portPart.split(separator: "-", omittingEmptySubsequences: false)
            guard (1...2).contains(bounds.count), let low = Int(bounds[0]), let high = Int(bounds.last!),
                (1...65535).contains(low), (1...65535).contains(high), low <= high
            else { throw invalid("port must be 1-65535 or a range lo-hi") }
            ports = low...high
            if let slash = hostPart.firstIndex(of: "/") {
                guard let address = IPAddress(String(hostPart[..<slash])),
                    let prefix = Int(hostPart[hostPart.index(after: slash)...]),
                    (0...(address.bytes.count * 8)).contains(prefix)
                else { throw invalid("malformed CIDR") }
                match = .network(address, prefix: prefix)
            } else if let address = IPAddress(String(hostPart)) {
                match = .network(address, prefix: address.bytes.count * 8)
            } else {
                let name = hostPart.lowercased()
                guard DNSName.isValid(name) else { throw invalid("not an IP, CIDR or host name") }
                match = .name(name)
            }
        }

        init(address: IPAddress, port: Int) {
            match = .network(address, prefix: address.bytes.count * 8)
            ports = port...port
        }

        func allows(host: String, address: IPAddress?, port: Int) -> Bool {
            guard ports.contains(port) else { return false }
            switch match {
            case .name(let name):
                return address == nil && name == host
            case .network(let network, let prefix):
                guard let address, address.bytes.count == network.bytes.count else { return false }
                var remaining = prefix
                for index in 0..<address.bytes.count where remaining > 0 {
                    let bits = min(8, remaining)
                    let mask = UInt8(truncatingIfNeeded: 0xFF << (8 - bits))
                    if address.bytes[index] & mask != network.bytes[index] & mask { return false }
                    remaining -= bits
                }
                return true
            }
        }
    }

    public let rules: [Rule]

    public init(rules: [Rule]) { self.rules = rules }

    /// The default: the kubelet ports 10250 and 10255 on loopback and on the node's own IPs.
    public static func kubeletDefault(nodeIPs: [IPAddress]) -> AllowList {
        var rules: [Rule] = []
        for address in [IPAddress("127.0.0.1")!, IPAddress("::1")!] + nodeIPs {
            rules.append(Rule(address: address, port: 10250))
            rules.append(Rule(address: address, port: 10255))
        }
        return AllowList(rules: rules)
    }

    /// Whether `host:port` may be dialled. `host` is already mapped (node name → loopback). An IPv4-mapped IPv6
    /// address is checked as the IPv4 address it reaches, so a broad IPv6 rule (`[::/0]:10250`) never lets
    /// `[::ffff:169.254.169.254]` through.
    public func allows(host: String, port: Int) -> Bool {
        let address = IPAddress(host)?.unmapped
        let name = host.lowercased()
        return rules.contains { $0.allows(host: name, address: address, port: port) }
    }

    /// For a target dialled by name: whether the address the name resolved to may be used. A name rule must
    /// not become a way to loopback or the cloud metadata address (DNS rebinding): special-purpose addresses
    /// (``IPAddress/isSpecialPurpose``) only where an address rule allows them.
    public func allowsResolved(_ address: IPAddress, port: Int) -> Bool {
        let address = address.unmapped
        if rules.contains(where: { $0.allows(host: address.description, address: address, port: port) }) { return true }
        return !address.isSpecialPurpose
    }

    public var description: String { rules.map(\.description).joined(separator: ", ") }
}
