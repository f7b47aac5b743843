import TunnelPKI
import TunnelSupport

/// The path of each server address: what an agent reports in HELLO (`path`) for the address its tunnel is on.
///
/// An entry of the address list (`--server-address`, the addresses file) may be marked with its path:
/// `private=HOST:PORT` or `internet=HOST:PORT`. An unmarked address is judged by its place: in a list of two or
/// more the first is the private line (an express-connect pool's list: the line, then the public address) and
/// the later ones the internet; a lone address is `private` if it is a private, shared (100.64/10), loopback or
/// link-local IP or a cluster name (`*.svc`, `*.cluster.local`, a name without a dot), else `internet`.
public enum AddressPaths {
    /// Splits entries into the addresses (marks removed, order kept) and the paths of the marked ones. An unknown
    /// mark, or one address marked with both paths, is an error naming the entry.
    public static func parse(_ entries: [String]) throws -> (addresses: [String], marks: [String: TunnelPath]) {
        var addresses: [String] = []
        var marks: [String: TunnelPath] = [:]
        for entry in entries {
            let parts = entry.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2 else {
                addresses.append(entry)
                continue
            }
            guard let path = TunnelPath(rawValue: String(parts[0])) else {
                throw ConfigurationError(
                    "invalid server address \"\(entry)\": mark an address as private=HOST:PORT or internet=HOST:PORT")
            }
            let address = String(parts[1])
            if let earlier = marks[address], earlier != path {
                throw ConfigurationError(
                    "server address \(address) is marked both \(earlier.rawValue) and \(path.rawValue)")
            }
            marks[address] = path
            addresses.append(address)
        }
        return (addresses, marks)
    }

    /// The path of `address` (one of `list`, marks removed) given the marks of the list.
    public static func path(of address: String, in list: [String], marks: [String: TunnelPath]) -> TunnelPath {
        if let marked = marks[address] { return marked }
        if list.count > 1, let index = list.firstIndex(of: address) { return index == 0 ? .private : .internet }
        return looksPrivate(address) ? .private : .internet
    }

    /// Whether an unmarked lone address is reached without the internet: a private, shared, loopback or link-local
    /// IP, or a cluster-internal name.
    static func looksPrivate(_ address: String) -> Bool {
        guard let host = HostPort.split(address)?.host else { return false }
        if let ip = IPAddress(String(host))?.unmapped {
            return privateNetworks.contains { $0.contains(ip) }
        }
        let name = host.lowercased().hasSuffix(".") ? String(host.lowercased().dropLast()) : host.lowercased()
        return !name.contains(".") || name.hasSuffix(".svc") || name.hasSuffix(".cluster.local")
    }

    private static let privateNetworks: [CIDR] = [
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "::1/128", "fc00::/7", "fe80::/10",
    ].compactMap { try? CIDR(parsing: $0) }
}

extension EdgeTunnelAgent {
    /// The path a tunnel on `address` takes, by the address list in force and its marks.
    func path(of address: ServerAddress) -> TunnelPath {
        let marks = addressPathMarks.withLockedValue { $0 } ?? configuration.addressPaths
        return AddressPaths.path(of: address.text, in: serverAddresses, marks: marks)
    }

    /// Replaces the address list with entries that may carry path marks (the addresses file, re-read).
    public func setServerAddresses(entries: [String]) throws {
        let (addresses, marks) = try AddressPaths.parse(entries)
        for address in addresses { _ = try ServerAddress(parsing: address) }
        addressPathMarks.withLockedValue { $0 = marks }
        try setServerAddresses(addresses)
    }
}
