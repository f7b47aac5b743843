import Crypto
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOHTTP1
import TunnelPKI

/// The join state as ConfigMaps in one namespace, so that every replica sees every token, join, reset and
/// revocation with no shared volume. A token is `edge-tunnel-token-ID` holding only its hash (as `tokens.json`
/// does: no Secret with the token in it, and no RBAC on Secrets); a node record is `edge-tunnel-node-HASH` (the
/// name's SHA-256, as node names may be longer than object names allow). Both carry the label
/// `edgetunnel.io/join-state` (`token` or `node`).
///
/// A change is a read, then a create or an update with the read's resourceVersion: of two replicas recording a
/// join of one name at once, the API server lets one win (409 for the other, which reads again and is refused).
/// Node IPs are claimed with an object each (``claim(_:for:now:)``): of two joins naming one IP through two
/// replicas at the same moment, one gets it.
public final class KubeJoinState: JoinStateStore, @unchecked Sendable {
    public let client: KubeClient
    public let namespace: String
    private let logger: Logger
    private let lock = NIOLock()
    /// By object name, with the resourceVersion the entry was seen at.
    private var cachedTokens: [String: StoredToken] = [:]
    private var cachedRecords: [String: (record: NodeRecord, version: String)] = [:]
    /// Node record objects that hold no valid record of their own node (hand-edited, or another node's record),
    /// by object name: each one's node counts as revoked (``hasUnreadableRecord(_:)``).
    private var unreadableRecords: Set<String> = []
    private var listed: Set<String> = []

    public static let label = "edgetunnel.io/join-state"

    public init(client: KubeClient, namespace: String, logger: Logger) {
        self.client = client
        self.namespace = namespace
        self.logger = logger
    }

    public var location: String { "namespace \(namespace)" }
    var collection: String { "/api/v1/namespaces/\(namespace)/configmaps" }

    static func tokenObjectName(_ id: String) -> String { "edge-tunnel-token-\(id)" }
    static func nodeObjectName(_ node: String) -> String {
        "edge-tunnel-node-" + Array(SHA256.hash(data: Array(node.utf8))).hexString.prefix(20)
    }

    // MARK: Following (the server)

    /// Both kinds have been listed once: before that, the server knows no revocation and must accept no node.
    public var isSynced: Bool { lock.withLock { listed.count == 2 } }
    public var knownTokens: [StoredToken] { lock.withLock { Array(cachedTokens.values) } }
    public var knownRecords: [NodeRecord] { lock.withLock { cachedRecords.values.map(\.record) } }

    /// Whether `node`'s record object exists but holds no valid record of it (hand-edited, or another node's
    /// record). Such a node counts as revoked, also on a replica that never saw its record parse: the object's
    /// name is a hash of the node's, so the object cannot say whose it was.
    public func hasUnreadableRecord(_ node: String) -> Bool {
        guard lock.withLock({ !unreadableRecords.isEmpty }) else { return false }  // no hash for every name asked
        let object = Self.nodeObjectName(node)
        return lock.withLock { unreadableRecords.contains(object) }
    }

    /// Follows the tokens and the node records until the task is cancelled; `onChange` after every change.
    public func follow(onChange: @escaping @Sendable () -> Void) async {
        await withTaskGroup(of: Void.self) { group in
            for kind in ["token", "node"] {
                group.addTask {
                    let watch = KubeWatch(
                        client: self.client, path: self.collection, query: "labelSelector=\(Self.label)%3D\(kind)",
                        what: "the join state (\(kind)s in \(self.namespace))", logger: self.logger)
                    await watch.run { change in
                        self.apply(change, kind: kind)
                        onChange()
                    }
                }
            }
        }
    }

    /// Applies a watch change. Revocation fails closed: a node is accepted only with a valid record of its own
    /// (the server refuses a node without one), so deleting a revoked node's object (a GitOps prune, a
    /// restore from an older backup) does not un-revoke it. An object that holds no valid record of its node
    /// (hand-edited, or another node's record: no object can speak for another node) makes that node count as
    /// revoked until it is fixed or deleted, on every replica, also one started after the edit; what was last
    /// seen of it stays known meanwhile (its IPs stay taken). A token that does not parse keeps what was last
    /// seen of it.
    func apply(_ change: KubeWatch.Change, kind: String) {
        lock.withLock {
            switch change {
            case .listed(let items):
                if kind == "token" {
                    var next: [String: StoredToken] = [:]
                    for object in items {
                        if let name = Self.name(object) { next[name] = token(object) ?? cachedTokens[name] }
                    }
                    cachedTokens = next
                } else {
                    var next: [String: (record: NodeRecord, version: String)] = [:]
                    var unreadable: Set<String> = []
                    for object in items {
                        guard let name = Self.name(object) else { continue }
                        switch recordEntry(object) {
                        case .valid(let record, let version):
                            next[name] = (record: record, version: version)
                        case .unreadable(let why):
                            noteUnreadable(name, why)
                            unreadable.insert(name)
                            next[name] = cachedRecords[name]
                        }
                    }
                    cachedRecords = next
                    unreadableRecords = unreadable
                }
                listed.insert(kind)
            case .added(let object), .modified(let object):
                guard let name = Self.name(object) else { return }
                if kind == "token" {
                    if let token = token(object) { cachedTokens[name] = token }
                    return
                }
                switch recordEntry(object) {
                case .valid(let record, let version):
                    cachedRecords[name] = (record: record, version: version)
                    unreadableRecords.remove(name)
                case .unreadable(let why):
                    noteUnreadable(name, why)
                    unreadableRecords.insert(name)
                }
            case .deleted(let object):
                guard let name = Self.name(object) else { return }
                if kind == "token" {
                    cachedTokens[name] = nil
                } else {
                    cachedRecords[name] = nil
                    unreadableRecords.remove(name)
                }
            }
        }
    }

    /// What a node record object holds: a record of its own node, with the resourceVersion it was seen at, or
    /// why it holds none that counts.
    private enum RecordEntry {
        case valid(NodeRecord, version: String)
        case unreadable(String)
    }

    private func recordEntry(_ object: [String: any Sendable]) -> RecordEntry {
        guard let record: NodeRecord = Self.parse(object, key: "record") else {
            return .unreadable("does not hold a valid node record")
        }
        guard Self.name(object) == Self.nodeObjectName(record.name) else {
            return .unreadable("holds the record of node \(record.name), whose object it is not")
        }
        return .valid(record, version: Self.version(object) ?? "")
    }

    /// Says once, when an object starts to make its node count as revoked, which object it is and why (called with
    /// the lock held).
    private func noteUnreadable(_ objectName: String, _ why: String) {
        guard !unreadableRecords.contains(objectName) else { return }
        let outcome =
            "its node counts as revoked and is refused until the object is fixed (or deleted, after which the node must join again)"
        logger.error("ConfigMap \(namespace)/\(objectName) \(why): \(outcome)")
    }

    private static func version(_ object: [String: Any]) -> String? {
        (object["metadata"] as? [String: Any])?["resourceVersion"] as? String
    }

    // MARK: JoinStateStore

    public func tokens() async throws -> [StoredToken] {
        try await list("token").compactMap(token).sorted { $0.created < $1.created }
    }
    public func nodes() async throws -> [NodeRecord] {
        try await list("node").compactMap(record).sorted { $0.name < $1.name }
    }

    public func createToken(
        ttl: Double, description: String?, nodes: [String]?, nodeCIDRs: [String]?
    ) async throws
        -> (BootstrapToken, StoredToken)
    {
        var taken = Set(try await tokens().map(\.id))
        for _ in 0..<5 {
            let (token, stored) = try TokenStore.make(
                ttl: ttl, description: description, nodes: nodes, nodeCIDRs: nodeCIDRs, taken: taken, now: Date())
            let object = try configMap(Self.tokenObjectName(stored.id), kind: "token", key: "token", value: stored)
            let answer = try await client.request(.POST, collection, body: object)
            if answer.status == 409 {  // the same id made elsewhere a moment ago
                taken.insert(stored.id)
                continue
            }
            guard answer.status == 201 || answer.status == 200 else {
                throw KubeWatch.failure(answer, "creating a token")
            }
            return (token, stored)
        }
        throw PKIError(.writeFailed, "cannot create a token in \(location): every id taken")
    }

    public func deleteToken(id: String) async throws {
        let id = try BootstrapToken.validateID(id)
        let answer = try await client.request(.DELETE, "\(collection)/\(Self.tokenObjectName(id))")
        if answer.status == 404 {
            throw PKIError(.tokenNotFound, "no bootstrap token with id \"\(id)\" in \(location)")
        }
        guard answer.status == 200 || answer.status == 202 else {
            throw KubeWatch.failure(answer, "deleting token \(id)")
        }
    }

    public func recordJoin(_ name: String, ips: [String], certificateValidFrom: Date) async throws {
        _ = try await joinRecord(name, ips: ips, certificateValidFrom: certificateValidFrom)
    }

    /// Records a join; returns the record as written (for ``undoJoin(_:)``).
    public func joinRecord(_ name: String, ips: [String], certificateValidFrom: Date) async throws -> NodeRecord {
        let others = isSynced ? knownRecords : try await nodes()
        // Whole seconds, as the object stores them: what is returned compares equal to what is read back.
        let now = Date(timeIntervalSince1970: Date().timeIntervalSince1970.rounded(.down))
        // What this replica has seen refuses most conflicts at no cost; the claims settle those between replicas.
        _ = try NodeRecord.joining(
            nil, name: name, ips: ips, certificateValidFrom: certificateValidFrom, others: others, now: now)
        let claimed = try await claim(ips, for: name, now: now)
        let written: NodeRecord?
        let version: String?
        do {
            (written, version) = try await update(name) { existing in
                try NodeRecord.joining(
                    existing, name: name, ips: ips, certificateValidFrom: certificateValidFrom,
                    others: others, now: now)
            }
        } catch {
            await release(claimed, of: name)
            throw error
        }
        guard let record = written else { throw PKIError(.writeFailed, "the join of \(name) was not recorded") }
        // Seen at once by this replica (the node's HELLO may follow before the watch event), unless the watch has
        // already brought something newer (a revocation right after the join).
        lock.withLock {
            let key = Self.nodeObjectName(name)
            if let seen = cachedRecords[key], let a = Int(seen.version), let b = Int(version ?? ""), a >= b { return }
            cachedRecords[key] = (record, version ?? "")
        }
        return record
    }

    /// Takes back a join whose certificate never reached the node: if the record is still exactly that join (not
    /// revoked or changed since), the name may join again and the undelivered certificate is void.
    public func undoJoin(_ joined: NodeRecord) async throws {
        let (undone, version) = try await update(joined.name) { existing in
            guard let existing, existing == joined else { return nil }
            var undone = NodeRecord.reset(existing, name: joined.name, now: Date())
            undone.revoked = existing.revoked
            return undone
        }
        if version != nil, undone?.ips.isEmpty == true { await release(joined.ips, of: joined.name) }
    }

    /// The node may join again; its IPs are free at once (their claims are deleted, not left to expire).
    public func reset(_ name: String) async throws {
        try await voidFreeingIPs(name) { NodeRecord.reset($0, name: name, now: $1) }
    }

    /// The node's certificates are void; its IPs are free at once for another node.
    public func revoke(_ name: String) async throws {
        try await voidFreeingIPs(name) { NodeRecord.revoked($0, name: name, now: $1) }
    }

    /// Writes the record `change` makes of the node's (a reset or a revocation, at `now`), then deletes the
    /// claims of the IPs it held that were made before it: a re-join since keeps its claim.
    private func voidFreeingIPs(_ name: String, _ change: (NodeRecord?, Date) -> NodeRecord) async throws {
        _ = try DNSName.validateNodeName(name)
        var held: [String] = []
        let now = Date()
        _ = try await update(name) { existing in
            held = existing?.ips ?? []
            return change(existing, now)
        }
        await release(held, of: name, claimedBefore: now)
    }

    /// Reads the node's record, changes it and writes it back only if nobody wrote it meanwhile (create, or update
    /// with the read's resourceVersion); on a conflict, reads again. `change` returning nil writes nothing. An
    /// object whose record does not parse is an error, never taken as no record. Returns what was written and
    /// the resourceVersion the API server gave it.
    @discardableResult
    private func update(
        _ node: String, _ change: (NodeRecord?) throws -> NodeRecord?
    ) async throws -> (NodeRecord?, String?) {
        let objectName = Self.nodeObjectName(node)
        let path = "\(collection)/\(objectName)"
        for _ in 0..<8 {
            let current = try await client.request(.GET, path)
            let answer: KubeClient.Response
            let written: NodeRecord
            switch current.status {
            case 404:
                guard let record = try change(nil) else { return (nil, nil) }
                written = record
                answer = try await client.request(
                    .POST, collection, body: try configMap(objectName, kind: "node", key: "record", value: record))
            case 200:
                guard var object = try JSONSerialization.jsonObject(with: Data(current.body)) as? [String: Any] else {
                    throw KubeClient.Failure(description: "ConfigMap \(namespace)/\(objectName) is not a JSON object")
                }
                guard let existing = self.record(object as [String: any Sendable]), existing.name == node else {
                    throw KubeClient.Failure(
                        description:
                            "ConfigMap \(namespace)/\(objectName) does not hold a valid record of node \(node): fix or delete it"
                    )
                }
                guard let record = try change(existing) else { return (existing, nil) }
                written = record
                var data = object["data"] as? [String: Any] ?? [:]
                data["record"] = try Self.json(record)
                object["data"] = data
                // The label is what the replicas watch: a record that lost it would go unseen.
                var metadata = object["metadata"] as? [String: Any] ?? [:]
                var labels = metadata["labels"] as? [String: Any] ?? [:]
                labels[Self.label] = "node"
                metadata["labels"] = labels
                object["metadata"] = metadata
                answer = try await client.request(
                    .PUT, path, body: Array(try JSONSerialization.data(withJSONObject: object)))
            default:
                throw KubeWatch.failure(current, "reading the record of node \(node)")
            }
            if answer.status == 409 { continue }
            guard (200...201).contains(answer.status) else {
                throw KubeWatch.failure(answer, "writing the record of node \(node)")
            }
            let version = (try? JSONSerialization.jsonObject(with: Data(answer.body)) as? [String: Any]).flatMap {
                Self.version($0)
            }
            return (written, version)
        }
        throw PKIError(.writeFailed, "the record of node \(node) in \(location) keeps changing: try again")
    }

    // MARK: Objects

    private func list(_ kind: String) async throws -> [[String: any Sendable]] {
        try await client.list(
            "\(collection)?labelSelector=\(Self.label)%3D\(kind)", what: "the \(kind)s in \(location)"
        ).items
    }

    func configMap<T: Encodable>(_ name: String, kind: String, key: String, value: T) throws -> [UInt8] {
        let object: [String: Any] = [
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": ["name": name, "namespace": namespace, "labels": [Self.label: kind]],
            "data": [key: try Self.json(value)],
        ]
        return Array(try JSONSerialization.data(withJSONObject: object))
    }

    private static func name(_ object: [String: any Sendable]) -> String? {
        (object["metadata"] as? [String: any Sendable])?["name"] as? String
    }

    /// The token an object holds; nil (logged) when it holds none that parses: a hand-edited object must not
    /// stop the others from counting.
    private func token(_ object: [String: any Sendable]) -> StoredToken? { decode(object, key: "token") }
    func record(_ object: [String: any Sendable]) -> NodeRecord? { decode(object, key: "record") }

    func decode<T: Decodable>(_ object: [String: any Sendable], key: String) -> T? {
        guard let value: T = Self.parse(object, key: key) else {
            logger.warning("ConfigMap \(namespace)/\(Self.name(object) ?? "?") has no valid \(key): ignored")
            return nil
        }
        return value
    }

    /// The value an object holds under `key` in its data, if it parses (nothing logged).
    static func parse<T: Decodable>(_ object: [String: any Sendable], key: String) -> T? {
        guard let text = (object["data"] as? [String: any Sendable])?[key] as? String else { return nil }
        return try? decoder.decode(T.self, from: Data(text.utf8))
    }

    static func json<T: Encodable>(_ value: T) throws -> String {
        String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    private static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.sortedKeys]
        return encoder
    }()

    private static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }()
}
