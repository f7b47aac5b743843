import Foundation

/// A Kubernetes version as clusters report it: `1.20.11`, `v1.22.15`, `v1.20.11-aliyun.1` (the suffix is
/// ignored: `v1.20.11-aliyun.1` is 1.20.11).
public struct KubernetesVersion: Comparable, Hashable, Sendable, CustomStringConvertible, Codable {
    public let major: Int
    public let minor: Int
    public let patch: Int

    public init(_ major: Int, _ minor: Int, _ patch: Int) {
        self.major = major
        self.minor = minor
        self.patch = patch
    }

    public init(parsing text: String) throws {
        var core = Substring(text.trimmingCharacters(in: .whitespaces))
        if core.hasPrefix("v") || core.hasPrefix("V") { core = core.dropFirst() }
        if let suffix = core.firstIndex(where: { $0 == "-" || $0 == "+" }) { core = core[..<suffix] }
        let parts = core.split(separator: ".", omittingEmptySubsequences: false)
        guard (2...3).contains(parts.count),
            let numbers = Optional(
                parts.compactMap { part -> Int? in
                    guard !part.isEmpty, part.allSatisfy(\.isASCII), part.allSatisfy(\.isNumber) else { return nil }
                    return Int(part)
                }), numbers.count == parts.count
        else {
            throw PlanError(
                "malformed Kubernetes version \"\(text)\": expected X.Y.Z such as 1.22.15 or v1.20.11-aliyun.1")
        }
        self.init(numbers[0], numbers[1], numbers.count == 3 ? numbers[2] : 0)
    }

    public static func < (lhs: Self, rhs: Self) -> Bool {
        (lhs.major, lhs.minor, lhs.patch) < (rhs.major, rhs.minor, rhs.patch)
    }

    public var description: String { "\(major).\(minor).\(patch)" }

    public init(from decoder: Decoder) throws {
        try self.init(parsing: try decoder.singleValueContainer().decode(String.self))
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}
