import Foundation
import TunnelPKI

/// A security group as Alibaba Cloud's `DescribeSecurityGroupAttribute` returns it (the fields this check
/// reads): `Permissions.Permission[]` with `IpProtocol`, `PortRange`, `SourceCidrIp`, `Policy`, `Direction`,
/// `Priority`.
public struct SecurityGroupExport: Decodable, Sendable {
    public struct Permission: Decodable, Sendable {
        public var ipProtocol: String
        public var portRange: String
        public var sourceCidrIp: String?
        public var ipv6SourceCidrIp: String?
        public var policy: String?
        public var direction: String?
        public var priority: Int?

        enum CodingKeys: String, CodingKey {
            case ipProtocol = "IpProtocol"
            case portRange = "PortRange"
            case sourceCidrIp = "SourceCidrIp"
            case ipv6SourceCidrIp = "Ipv6SourceCidrIp"
            case policy = "Policy"
            case direction = "Direction"
            case priority = "Priority"
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            ipProtocol = try c.decode(String.self, forKey: .ipProtocol)
            portRange = try c.decode(String.self, forKey: .portRange)
            sourceCidrIp = try c.decodeIfPresent(String.self, forKey: .sourceCidrIp)
            ipv6SourceCidrIp = try c.decodeIfPresent(String.self, forKey: .ipv6SourceCidrIp)
            policy = try c.decodeIfPresent(String.self, forKey: .policy)
            direction = try c.decodeIfPresent(String.self, forKey: .direction)
            // The API returns Priority as a string ("1") in some versions and a number in others.
            if let number = try? c.decodeIfPresent(Int.self, forKey: .priority) {
                priority = number
            } else if let text = try c.decodeIfPresent(String.self, forKey: .priority) {
                guard let number = Int(text) else { throw PlanError("Priority \"\(text)\" is not a number") }
                priority = number
            }
        }
    }

    struct PermissionList: Decodable {
        var permission: [Permission]
        enum CodingKeys: String, CodingKey { case permission = "Permission" }
    }
    private var permissionList: PermissionList
    public var SecurityGroupId: String?

    enum CodingKeys: String, CodingKey {
        case permissionList = "Permissions"
        case SecurityGroupId
    }

    public var permissions: [Permission] { permissionList.permission }

    /// Reads an export; errors name the file.
    public static func load(path: String, data: Data) throws -> SecurityGroupExport {
        do {
            return try JSONDecoder().decode(SecurityGroupExport.self, from: data)
        } catch let error as PlanError {
            throw PlanError("\(path): \(error.description)")
        } catch {
            throw PlanError("\(path): not a DescribeSecurityGroupAttribute export with Permissions.Permission[]")
        }
    }
}

/// Whether a security group lets a protocol and port in from every address of a CIDR.
///
/// Alibaba Cloud's rules: among the rules that match a packet, the one with the smallest `Priority` number
/// wins (1 is the highest priority); at equal priority Drop wins over Accept; with no matching rule, inbound
/// traffic is denied. CIDRs are either nested or disjoint, so the addresses of the edge CIDR fall into
/// regions: the edge CIDR itself and each rule source nested inside it. Every region must be accepted.
public struct SecurityGroupVerdict: Sendable, Equatable {
    public var allowed: Bool
    public var explanation: String

    public static func evaluate(
        _ group: SecurityGroupExport, protocol proto: String, port: Int, from edge: CIDR
    ) -> SecurityGroupVerdict {
        struct Rule {
            var source: CIDR
            var accept: Bool
            var priority: Int
            var text: String
        }
        var rules: [Rule] = []
        for permission in group.permissions {
            guard (permission.direction ?? "ingress").lowercased() == "ingress" else { continue }
            let protocolMatches = ["all", proto.lowercased()].contains(permission.ipProtocol.lowercased())
            guard protocolMatches, portRange(permission.portRange, contains: port) else { continue }
            for sourceText in [permission.sourceCidrIp, permission.ipv6SourceCidrIp].compactMap({ $0 })
            where !sourceText.isEmpty {
                guard let source = try? CIDR(parsing: sourceText), source.overlaps(edge) else { continue }
                let accept = (permission.policy ?? "accept").lowercased() != "drop"
                let priority = permission.priority ?? 1
                rules.append(
                    Rule(
                        source: source, accept: accept, priority: priority,
                        text:
                            "\(accept ? "accept" : "drop") \(permission.ipProtocol) \(permission.portRange) from \(source) priority \(priority)"
                    ))
            }
        }
        // Regions: the edge CIDR, and every rule source strictly inside it.
        var regions = [edge]
        for rule in rules where edge.contains(rule.source) && rule.source != edge && !regions.contains(rule.source) {
            regions.append(rule.source)
        }
        for region in regions {
            let applying = rules.filter { $0.source.contains(region) }
            let label = "\(proto.uppercased()) \(port) from \(region)"
            guard let best = applying.min(by: { ($0.priority, $0.accept ? 1 : 0) < ($1.priority, $1.accept ? 1 : 0) })
            else {
                if region == edge && regions.count > 1 && coveredByNested(edge, regions.dropFirst()) { continue }
                return SecurityGroupVerdict(
                    allowed: false, explanation: "no rule accepts \(label) (inbound is denied by default)")
            }
            if !best.accept {
                return SecurityGroupVerdict(allowed: false, explanation: "\(label) is dropped by rule \"\(best.text)\"")
            }
        }
        let accepting = rules.filter { $0.accept && $0.source.contains(edge) }.min { $0.priority < $1.priority }
        return SecurityGroupVerdict(
            allowed: true,
            explanation: "\(proto.uppercased()) \(port) from \(edge) is accepted"
                + (accepting.map { " by rule \"\($0.text)\"" } ?? ""))
    }

    /// Whether nested networks cover `edge` entirely (two halves, recursively): then `edge`'s own rules decide
    /// nothing.
    static func coveredByNested(_ edge: CIDR, _ nested: ArraySlice<CIDR>) -> Bool {
        let bits = edge.address.bytes.count * 8
        if nested.contains(where: { $0.contains(edge) }) { return true }
        // Only halves that some nested network touches can be covered: this keeps the walk linear.
        guard edge.prefix < bits, nested.contains(where: { edge.contains($0) }) else { return false }
        let (low, high) = halves(edge)
        return coveredByNested(low, nested) && coveredByNested(high, nested)
    }

    static func halves(_ cidr: CIDR) -> (CIDR, CIDR) {
        let prefix = cidr.prefix + 1
        let low = try! CIDR(parsing: "\(cidr.address)/\(prefix)")
        var bytes = cidr.address.bytes
        let bit = cidr.prefix
        bytes[bit / 8] |= UInt8(0x80 >> (bit % 8))
        let high = try! CIDR(parsing: "\(IPAddressText(bytes))/\(prefix)")
        return (low, high)
    }

    static func portRange(_ text: String, contains port: Int) -> Bool {
        let parts = text.split(separator: "/")
        guard parts.count == 2, let low = Int(parts[0]), let high = Int(parts[1]) else { return false }
        if low == -1 && high == -1 { return true }
        return (low...max(low, high)).contains(port)
    }
}

private func IPAddressText(_ bytes: [UInt8]) -> String {
    IPAddress(bytes: bytes)!.description
}
