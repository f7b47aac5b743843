import Foundation
import NIOConcurrencyHelpers
import TunnelPKI

/// The server's view of ``NodeStore`` (`nodes.json`): which node names have joined, which are reset or revoked.
///
/// Read once at start and again whenever the file changes (``reloadIfChanged()``, every few seconds), so that
/// `edgetunnel node revoke` reaches a running server without a restart. Joins go through ``recordJoin``, which
/// checks and writes under one lock: two joins for one name cannot both succeed. Thread-safe.
final class NodeIdentities: @unchecked Sendable {
    private let store: NodeStore
    private let lock = NIOLock()
    private var records: [String: NodeRecord] = [:]
    /// The file's identity and modification time when it was last read.
    private var stamp: [Int] = []
    private var _generation = 0

    /// Counts the times the records changed (read anew or joined): whoever acts on changes compares it.
    var generation: Int { lock.withLock { _generation } }

    init(paths: PKIPaths) throws {
        store = NodeStore(paths: paths)
        _ = try reloadIfChanged()
    }

    /// Records kept elsewhere (Kubernetes objects): the file is no longer read, ``replace(_:synced:)`` sets them.
    private var external = false
    /// With external records: whether they have been listed yet.
    private var synced = true
    /// With external records: whether a name's record exists but cannot be read (the node counts as revoked).
    private var unreadable: @Sendable (String) -> Bool = { _ in false }

    /// Whether a certificate of `node`, valid from `notValidBefore`, may be used (not revoked, not voided by a
    /// reset).
    ///
    /// External records (Kubernetes objects) fail closed: only a name with a readable record is accepted, and
    /// none before they are first listed. A record deleted (a GitOps prune, a restore from an older backup) or
    /// made unreadable must not un-revoke its node; every node that joins gets a record there.
    ///
    /// With `nodes.json`, names without a record are accepted: certificates of nodes that joined before the file
    /// existed, and those issued without a join (`edgetunnel pki issue-client --org edge-tunnel:agents`, the demo,
    /// `edgetunnel bench swarm`). Only whoever may write the PKI folder can remove a record there, and a file
    /// that does not parse is never taken as no records (the server does not start, or keeps the last state).
    func accepts(node: String, certificateValidFrom notValidBefore: Date) -> Bool {
        let (record, isSynced, isExternal, isUnreadable): (NodeRecord?, Bool, Bool, @Sendable (String) -> Bool) =
            lock.withLock { (records[node], synced, external, unreadable) }
        guard isSynced else { return false }
        guard isExternal else { return record?.accepts(certificateValidFrom: notValidBefore) ?? true }
        guard let record, !isUnreadable(node) else { return false }
        return record.accepts(certificateValidFrom: notValidBefore)
    }

    /// False while external records have not been listed yet: no node is accepted until they are.
    var isLoaded: Bool { lock.withLock { synced } }

    /// The records as the Kubernetes objects hold them now; `synced` once they have been listed. `unreadable`
    /// says whether a name's record object exists but holds no valid record of it: the node counts as revoked.
    func replace(
        _ nodes: [NodeRecord], synced: Bool, unreadable: @escaping @Sendable (String) -> Bool = { _ in false }
    ) {
        lock.withLock {
            external = true
            self.synced = synced
            self.unreadable = unreadable
            records = Dictionary(nodes.map { ($0.name, $0) }, uniquingKeysWith: { $1 })
            _generation += 1
        }
    }

    /// The nodes that have joined and are not revoked: the ones a replica expects a tunnel from.
    var expectedNodes: Set<String> {
        let (current, isUnreadable): ([String: NodeRecord], @Sendable (String) -> Bool) = lock.withLock {
            (records, unreadable)
        }
        return Set(
            current.values.filter { $0.joined != nil && $0.revoked == nil && !isUnreadable($0.name) }.map(\.name))
    }

    /// The moment a new certificate of `node` must be issued at (its validity start), so that it counts after a
    /// reset in the same second: now, or the reset's rounded-up second if that is later.
    func issuingTime(for node: String) -> Date {
        max(Date(), lock.withLock { records[node]?.certificatesValidFrom } ?? .distantPast)
    }

    /// Re-reads the file if it changed; returns whether it did. A file that cannot be read keeps the last state.
    @discardableResult
    func reloadIfChanged() throws -> Bool {
        guard !lock.withLock({ external }) else { return false }
        let current = AtomicFile.stamp(store.path)
        guard current != lock.withLock({ stamp }) else { return false }
        let nodes = try store.list()
        lock.withLock {
            records = Dictionary(nodes.map { ($0.name, $0) }, uniquingKeysWith: { $1 })
            stamp = current
            _generation += 1
        }
        return true
    }

    /// Records a join whose certificate is valid from `certificateValidFrom`; throws (naming the node) if it has
    /// joined before and was not reset, is revoked, was reset meanwhile, or names another node's IP.
    func recordJoin(_ name: String, ips: [IPAddress], certificateValidFrom: Date) throws {
        try lock.withLock {
            try store.recordJoin(name, ips: ips.map(\.description), certificateValidFrom: certificateValidFrom)
            if let record = try store.record(name) { records[name] = record }
            stamp = AtomicFile.stamp(store.path)
            _generation += 1
        }
    }
}
