#if canImport(Glibc)
import Glibc
#endif

/// An IPv4 or IPv6 address in its raw network-order bytes, as certificates carry it in an IP SAN.
public struct IPAddress: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// 4 bytes for IPv4, 16 for IPv6.
    public let bytes: [UInt8]

    /// Parses the textual forms `inet_pton` accepts (`10.0.3.7`, `fd00::1`); `nil` for anything else.
    public init?(_ text: String) {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            bytes = withUnsafeBytes(of: &v4) { Array($0) }
            return
        }
        var v6 = in6_addr()
        let bare = text.hasPrefix("[") && text.hasSuffix("]") ? String(text.dropFirst().dropLast()) : text
        if inet_pton(AF_INET6, bare, &v6) == 1 {
            bytes = withUnsafeBytes(of: &v6) { Array($0) }
            return
        }
        return nil
    }

    /// Wraps raw bytes; `nil` unless there are 4 or 16 of them.
    public init?(bytes: some Collection<UInt8>) {
        guard bytes.count == 4 || bytes.count == 16 else { return nil }
        self.bytes = Array(bytes)
    }

    public var isIPv4: Bool { bytes.count == 4 }

    /// 127.0.0.0/8 or ::1.
    public var isLoopback: Bool {
        isIPv4 ? bytes[0] == 127 : bytes == [UInt8](repeating: 0, count: 15) + [1]
    }

    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), or one in the well-known NAT64 prefix
    /// (`64:ff9b::a.b.c.d`), as the IPv4 address it reaches; any other unchanged.
    public var unmapped: IPAddress {
        guard !isIPv4,
            bytes.prefix(12).elementsEqual([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff])
                || bytes.prefix(12).elementsEqual([0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0])
        else { return self }
        return IPAddress(bytes: bytes.suffix(4))!
    }

    /// Loopback, link-local (the cloud metadata address 169.254.169.254 among them), unspecified, multicast, or a
    /// cloud's own metadata address outside link-local (Alibaba Cloud's 100.100.100.200, AWS's `fd00:ec2::254`):
    /// addresses a host name in the edge network should never lead to.
    public var isSpecialPurpose: Bool {
        let address = unmapped
        if address.isLoopback { return true }
        let b = address.bytes
        if address.isIPv4 {
            return b[0] == 0 || (b[0] == 169 && b[1] == 254) || b[0] >= 224 || b.elementsEqual([100, 100, 100, 200])
        }
        return b.allSatisfy { $0 == 0 } || (b[0] == 0xfe && b[1] & 0xc0 == 0x80) || b[0] == 0xff
            || b.elementsEqual([0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54])
    }

    public var description: String {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        let family = isIPv4 ? AF_INET : AF_INET6
        let ok = bytes.withUnsafeBytes { raw in
            inet_ntop(family, raw.baseAddress, &buffer, socklen_t(buffer.count)) != nil
        }
        guard ok else { return bytes.map(String.init).joined(separator: ".") }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public static func < (lhs: IPAddress, rhs: IPAddress) -> Bool {
        if lhs.bytes.count != rhs.bytes.count { return lhs.bytes.count < rhs.bytes.count }
        return lhs.bytes.lexicographicallyPrecedes(rhs.bytes)
    }

    /// Parses `text` or throws an error that names it.
    public static func parse(_ text: String) throws(PKIError) -> IPAddress {
        guard let address = IPAddress(text) else {
            throw PKIError(.invalidIPAddress, "invalid IP address \"\(text)\"")
        }
        return address
    }
}

/// DNS names and Kubernetes node names, checked the way Kubernetes checks them.
public enum DNSName {
    /// Whether `name` is an RFC 1123 subdomain (lower case, labels of 1–63 letters, digits and hyphens that
    /// start and end alphanumeric, 253 characters at most). A leading `*.` wildcard is allowed when `wildcard`.
    public static func isValid(_ name: String, allowWildcard: Bool = false) -> Bool {
        var rest = Substring(name)
        if allowWildcard, rest.hasPrefix("*.") { rest = rest.dropFirst(2) }
        guard !rest.isEmpty, name.utf8.count <= 253, IPAddress(String(rest)) == nil else { return false }
        for label in rest.split(separator: ".", omittingEmptySubsequences: false) {
            let utf8 = label.utf8
            guard (1...63).contains(utf8.count) else { return false }
            for byte in utf8 {
                let ok =
                    (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
                    || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")) || byte == UInt8(ascii: "-")
                guard ok else { return false }
            }
            guard utf8.first != UInt8(ascii: "-"), utf8.last != UInt8(ascii: "-") else { return false }
        }
        return true
    }

    /// Checks a DNS name for a certificate SAN, or throws an error that names it.
    public static func validate(_ name: String) throws(PKIError) -> String {
        guard isValid(name, allowWildcard: true) else {
            throw PKIError(
                .invalidDNSName,
                "invalid DNS name \"\(name)\": use lower-case letters, digits, '-' and '.', labels of 1-63 characters"
            )
        }
        return name
    }

    /// Checks a Kubernetes node name, or throws an error that names it.
    public static func validateNodeName(_ name: String) throws(PKIError) -> String {
        guard isValid(name) else {
            throw PKIError(
                .invalidNodeName,
                "invalid node name \"\(name)\": a node name is a lower-case RFC 1123 subdomain (letters, digits, '-', '.')"
            )
        }
        return name
    }
}

/// The subject alternative names of the tunnel server's serving certificate.
///
/// Always the loopback address and the in-cluster names of the `x-tunnel-server-svc` Service, plus every
/// address the server is reached at (Service ClusterIP, load balancer addresses, extra addresses), so that a
/// certificate follows the server's addresses rather than one fixed endpoint.
public struct ServerSANs: Hashable, Sendable {
    public static let serviceName = "x-tunnel-server-svc"
    public static let serviceNamespace = "kube-system"
    /// The DNS names every server certificate carries: the Service's names as seen from inside the cluster.
    public static let serviceDNSNames = [
        serviceName,
        "\(serviceName).\(serviceNamespace)",
        "\(serviceName).\(serviceNamespace).svc",
        "\(serviceName).\(serviceNamespace).svc.cluster.local",
    ]
    public static let loopback = IPAddress("127.0.0.1")!

    /// Sorted, without duplicates.
    public let ipAddresses: [IPAddress]
    /// Sorted, without duplicates.
    public let dnsNames: [String]

    /// The SAN set for the given extra addresses; checks every one and names the first that is invalid.
    public init(ips: [String], dnsNames: [String]) throws(PKIError) {
        var ipSet: Set<IPAddress> = [Self.loopback]
        for ip in ips { ipSet.insert(try IPAddress.parse(ip)) }
        var nameSet = Set(Self.serviceDNSNames)
        for name in dnsNames { nameSet.insert(try DNSName.validate(name)) }
        self.init(exactIPs: ipSet, exactDNSNames: nameSet)
    }

    /// A SAN set exactly as given (for reading one back from a certificate).
    public init(exactIPs: some Sequence<IPAddress>, exactDNSNames: some Sequence<String>) {
        self.ipAddresses = Set(exactIPs).sorted()
        self.dnsNames = Set(exactDNSNames).sorted()
    }
}
