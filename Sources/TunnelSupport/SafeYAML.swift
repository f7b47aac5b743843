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
        guard keysArePlain(node, depth: 0) else {
            throw Failure(description: "a mapping key is not a plain string, or the document nests deeper than 64 levels")
        }
        return node.any
    }

    private static func keysArePlain(_ node: Node, depth: Int) -> Bool {
        guard depth < 64 else { return false }
        switch node {
        case .mapping(let mapping):
            return mapping.allSatisfy { $0.key.scalar != nil && keysArePlain($0.value, depth: depth + 1) }
        case .sequence(let sequence):
            return sequence.allSatisfy { keysArePlain($0, depth: depth + 1) }
        default:
            return true
        }
    }
}
