import Logging
import NIOConcurrencyHelpers

/// The cluster's Node objects, followed live: which nodes exist and the addresses each reports
/// (`status.addresses`). The server lets an agent register only as a Node that exists and claim only addresses
/// its Node reports, and closes the tunnel of a Node that is deleted. Thread-safe.
public final class NodeDirectory: @unchecked Sendable {
    private let watch: KubeWatch
    private let lock = NIOLock()
    private var nodes: [String: [String]] = [:]
    private var loaded = false

    public init(client: KubeClient, logger: Logger) {
        watch = KubeWatch(client: client, path: "/api/v1/nodes", query: "", what: "Node objects", logger: logger)
    }

    /// Whether the first list has arrived: before it, no node can be told apart from a missing one.
    public var isLoaded: Bool { lock.withLock { loaded } }

    /// The addresses Node `name` reports, or nil if there is no such Node.
    public func addresses(of name: String) -> [String]? { lock.withLock { nodes[name] } }

    /// Follows the Nodes until the task is cancelled; `onDeleted` is called with each Node that goes away.
    public func run(onDeleted: @escaping @Sendable (String) -> Void) async {
        await watch.run { [weak self] change in
            guard let self else { return }
            var gone: [String] = []
            self.lock.withLock {
                switch change {
                case .listed(let items):
                    let fresh = Dictionary(items.compactMap(Self.entry), uniquingKeysWith: { $1 })
                    gone = self.nodes.keys.filter { fresh[$0] == nil }
                    self.nodes = fresh
                    self.loaded = true
                case .added(let node), .modified(let node):
                    if let (name, addresses) = Self.entry(node) { self.nodes[name] = addresses }
                case .deleted(let node):
                    if let (name, _) = Self.entry(node) {
                        self.nodes[name] = nil
                        gone = [name]
                    }
                }
            }
            for name in gone { onDeleted(name) }
        }
    }

    /// A Node's name and the addresses in its `status.addresses` (every type: InternalIP, ExternalIP, ...).
    static func entry(_ node: [String: any Sendable]) -> (String, [String])? {
        guard let name = (node["metadata"] as? [String: any Sendable])?["name"] as? String else { return nil }
        let listed = (node["status"] as? [String: any Sendable])?["addresses"] as? [[String: any Sendable]] ?? []
        return (name, listed.compactMap { $0["address"] as? String })
    }
}
