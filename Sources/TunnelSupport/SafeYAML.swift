import Yams

/// YAML read without the traps of `Yams.load(yaml:)`: its untyped constructor force-unwraps every mapping key
/// as a string, so `{[a]: 1}` in a config file stopped the process (found by the FuzzConfig fuzzer). Here the
/// document is composed first and refused with an error when any mapping key is not a plain scalar.
public enum SafeYAML {
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    /// The document as plain values (`[String: Any]`, `[Any]`, scalars), nil when empty.
    public static func load(_ text: String) throws -> Any? {
        guard let node = try Yams.compose(yaml: text) else { return nil }
        var budget = maxNodes
        guard keysArePlain(node, depth: 0, budget: &budget) else {
            throw Failure(
                description:
                    "a mapping key is not a plain string, or the document nests deeper than 64 levels or has more "
                    + "than \(maxNodes) values (aliases counted as often as they are used)")
        }
        return node.any
    }

    /// Values visited at most: aliases make a short file stand for an exponential tree ("billion laughs").
    static let maxNodes = 100_000

    private static func keysArePlain(_ node: Node, depth: Int, budget: inout Int) -> Bool {
        budget -= 1
        guard depth < 64, budget >= 0 else { return false }
        switch node {
        case .mapping(let mapping):
            for (key, value) in mapping {
                guard key.scalar != nil, keysArePlain(value, depth: depth + 1, budget: &budget) else { return false }
            }
            return true
        case .sequence(let sequence):
            for value in sequence where !keysArePlain(value, depth: depth + 1, budget: &budget) { return false }
            return true
        default:
            return true
        }
    }
}
