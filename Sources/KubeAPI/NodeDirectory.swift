import Logging
import NIOConcurrencyHelpers
import TunnelSupport

/// The cluster's Node objects, followed live: which nodes exist and the addresses each reports
/// (`status.addresses`). The server lets an agent register only as a Node that exists and claim only addresses
/// its Node reports, closes the tunnel of a Node that is deleted, and stops routing an address to a node whose
/// Node no longer reports it (removed, or given to another Node). Thread-safe.
///
/// It also keeps each Node's edge pool: the value of the first of ``poolLabels`` the Node carries (`--pool-label`,
/// then OpenYurt's and ACK's node-pool labels). The server reports that pool for the node's agent, whatever the
/// agent declares.
public final class NodeDirectory: @unchecked Sendable {
    private let watch: KubeWatch
    private let lock = NIOLock()
    private var nodes: [String: [String]] = [:]
    /// The pool of each Node that carries a pool label with a valid value.
    private var pools: [String: String] = [:]
    private var loaded = false
    /// The label keys read for a Node's pool, first found wins.
    public let poolLabels: [String]

    /// `poolLabel`: the key read first for a Node's pool (`--pool-label`); OpenYurt's and ACK's node-pool labels
    /// are read after it.
    public init(client: KubeClient, logger: Logger, poolLabel: String = PoolName.openYurtLabel) {
        watch = KubeWatch(client: client, path: "/api/v1/nodes", query: "", what: "Node objects", logger: logger)
        var keys = [poolLabel]
        for key in [PoolName.openYurtLabel, PoolName.ackLabel] where !keys.contains(key) { keys.append(key) }
        poolLabels = keys
    }

    /// Whether the first list has arrived: before it, no node can be told apart from a missing one.
    public var isLoaded: Bool { lock.withLock { loaded } }

    /// The addresses Node `name` reports, or nil if there is no such Node.
    public func addresses(of name: String) -> [String]? { lock.withLock { nodes[name] } }

    /// The pool Node `name`'s labels put it in; nil if there is no such Node or it carries no pool label.
    public func pool(of name: String) -> String? { lock.withLock { pools[name] } }

    /// What one change of the watch did to the directory.
    public struct Update: Sendable, Equatable {
        /// Nodes that exist now and whose addresses are not the ones they were (a Node added counts).
        public var changed: [String] = []
        /// Nodes that went away.
        public var deleted: [String] = []
    }

    /// Follows the Nodes until the task is cancelled. `onDeleted` is called with each Node that goes away,
    /// `onAddressesChanged` with the Nodes whose addresses changed (not for the many updates of a Node's
    /// status that leave its addresses as they were). Both are called after the directory holds the change.
    public func run(
        onDeleted: @escaping @Sendable (String) -> Void,
        onAddressesChanged: @escaping @Sendable ([String]) -> Void = { _ in }
    ) async {
        await watch.run { [weak self] change in
            guard let self else { return }
            let update = self.apply(change)
            if !update.changed.isEmpty { onAddressesChanged(update.changed) }
            for name in update.deleted { onDeleted(name) }
        }
    }

    /// Takes one change of the watch; returns which Nodes' addresses changed and which Nodes went away.
    @discardableResult
    func apply(_ change: KubeWatch.Change) -> Update {
        lock.withLock {
            var update = Update()
            switch change {
            case .listed(let items):
                let fresh = Dictionary(items.compactMap(Self.entry), uniquingKeysWith: { $1 })
                update.deleted = nodes.keys.filter { fresh[$0] == nil }.sorted()
                update.changed = fresh.filter { nodes[$0.key] != $0.value }.map(\.key).sorted()
                nodes = fresh
                pools = Dictionary(
                    items.compactMap { node in
                        Self.entry(node).flatMap { entry in self.pool(in: node).map { (entry.0, $0) } }
                    }, uniquingKeysWith: { $1 })
                loaded = true
            case .added(let node), .modified(let node):
                if let (name, addresses) = Self.entry(node) {
                    if nodes[name] != addresses { update.changed = [name] }
                    nodes[name] = addresses
                    pools[name] = pool(in: node)
                }
            case .deleted(let node):
                if let (name, _) = Self.entry(node) {
                    nodes[name] = nil
                    pools[name] = nil
                    update.deleted = [name]
                }
            }
            return update
        }
    }

    /// The pool a Node's labels name: the value of the first of ``poolLabels`` it carries, if that is a valid
    /// label value.
    func pool(in node: [String: any Sendable]) -> String? {
        let labels = (node["metadata"] as? [String: any Sendable])?["labels"] as? [String: any Sendable] ?? [:]
        for key in poolLabels {
            guard let value = labels[key] as? String else { continue }
            return PoolName.isLabelValue(value) ? value : nil
        }
        return nil
    }

    /// A Node's name and the addresses in its `status.addresses` (every type: InternalIP, ExternalIP, ...).
    static func entry(_ node: [String: any Sendable]) -> (String, [String])? {
        guard let name = (node["metadata"] as? [String: any Sendable])?["name"] as? String else { return nil }
        let listed = (node["status"] as? [String: any Sendable])?["addresses"] as? [[String: any Sendable]] ?? []
        return (name, listed.compactMap { $0["address"] as? String })
    }
}
