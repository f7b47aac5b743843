import TunnelPKI

/// The key admission limits count a peer's address under: an IPv4 address as itself (also when a dual-stack
/// listener reports it IPv4-mapped, `::ffff:a.b.c.d`), an IPv6 address by its /64, since one host is routinely
/// given a whole /64 and can send from any address in it. Anything else (a Unix socket's "local") as it is.
public enum SourceKey {
    public static func of(_ source: String) -> String {
        guard let address = IPAddress(source)?.unmapped else { return source }
        guard !address.isIPv4 else { return address.description }
        // Sixteen bytes always make an address; the fallback only keeps a trap off the peer's path.
        guard let network = IPAddress(bytes: address.bytes.prefix(8) + [UInt8](repeating: 0, count: 8)) else {
            return address.description
        }
        return network.description + "/64"
    }
}
