/// An IPv4 or IPv6 network such as `10.1.0.0/16`. A bare address is a /32 (or /128).
public struct CIDR: Hashable, Sendable, CustomStringConvertible, Codable {
    public let address: IPAddress
    public let prefix: Int

    public init(parsing text: String) throws {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), let address = IPAddress(String(parts[0])) else {
            throw PKIError(
                .invalidArgument, "malformed CIDR \"\(text)\": expected an address and prefix such as 10.1.0.0/16")
        }
        let bits = address.bytes.count * 8
        let prefix: Int
        if parts.count == 2 {
            guard let value = Int(parts[1]), (0...bits).contains(value), parts[1].allSatisfy(\.isNumber) else {
                throw PKIError(.invalidArgument, "malformed CIDR \"\(text)\": prefix must be 0-\(bits)")
            }
            prefix = value
        } else {
            prefix = bits
        }
        self.address = CIDR.mask(address, prefix)
        self.prefix = prefix
    }

    /// "0.0.0.0/0" style: every IPv4 (or IPv6) address.
    public var isAny: Bool { prefix == 0 }
    public var isIPv4: Bool { address.isIPv4 }

    /// Whether every address of `other` is in this network.
    public func contains(_ other: CIDR) -> Bool {
        guard isIPv4 == other.isIPv4, other.prefix >= prefix else { return false }
        return CIDR.mask(other.address, prefix) == address
    }

    public func contains(_ ip: IPAddress) -> Bool {
        guard ip.isIPv4 == isIPv4 else { return false }
        return CIDR.mask(ip, prefix) == address
    }

    /// Whether the networks share any address (CIDRs are either nested or disjoint).
    public func overlaps(_ other: CIDR) -> Bool { contains(other) || other.contains(self) }

    static func mask(_ address: IPAddress, _ prefix: Int) -> IPAddress {
        var bytes = address.bytes
        var remaining = prefix
        for index in bytes.indices {
            let bits = min(8, max(0, remaining))
            let mask: UInt8 = bits == 0 ? 0 : UInt8(truncatingIfNeeded: 0xFF << (8 - bits))
            bytes[index] &= mask
            remaining -= 8
        }
        return IPAddress(bytes: bytes)!
    }

    public var description: String { "\(address)/\(prefix)" }

    public init(from decoder: Decoder) throws {
        try self.init(parsing: try decoder.singleValueContainer().decode(String.self))
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}
