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
/// Node IPs are checked against the records this replica has seen, so two joins claiming one IP at the same
/// moment on two replicas can both pass (the IPs are still bound to each node's certificate).
public final class KubeJoinState: JoinStateStore, @unchecked Sendable {
    public let client: KubeClient
    public let namespace: String
    private let logger: Logger
    private let lock = NIOLock()
    private var cachedTokens: [String: StoredToken] = [:]
    private var cachedRecords: [String: NodeRecord] = [:]
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
        "edge-tunnel-node-" + SHA256.hash(data: Array(node.utf8)).map { String(format: "%02x", $0) }.joined().prefix(20)
    }

    // MARK: Following (the server)

    /// Both kinds have been listed once: before that, the server knows no revocation and must accept no node.
    public var isSynced: Bool { lock.withLock { listed.count == 2 } }
    public var knownTokens: [StoredToken] { lock.withLock { Array(cachedTokens.values) } }
    public var knownRecords: [NodeRecord] { lock.withLock { Array(cachedRecords.values) } }

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

    private func apply(_ change: KubeWatch.Change, kind: String) {
        lock.withLock {
            switch change {
            case .listed(let items):
                if kind == "token" {
                    cachedTokens = Dictionary(items.compactMap { o in Self.name(o).flatMap { n in token(o).map { (n, $0) } } },
                                              uniquingKeysWith: { $1 })
                } else {
                    cachedRecords = Dictionary(items.compactMap { o in Self.name(o).flatMap { n in record(o).map { (n, $0) } } },
                                               uniquingKeysWith: { $1 })
                }
                listed.insert(kind)
            case .added(let object), .modified(let object):
                guard let name = Self.name(object) else { return }
                if kind == "token" { cachedTokens[name] = token(object) } else { cachedRecords[name] = record(object) }
            case .deleted(let object):
                guard let name = Self.name(object) else { return }
                if kind == "token" { cachedTokens[name] = nil } else { cachedRecords[name] = nil }
            }
        }
    }

    // MARK: JoinStateStore

    public func tokens() async throws -> [StoredToken] { try await list("token").compactMap(token) }
    public func nodes() async throws -> [NodeRecord] { try await list("node").compactMap(record) }

    public func createToken(ttl: Double, description: String?, nodes: [String]?, nodeCIDRs: [String]?) async throws
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
            guard answer.status == 201 || answer.status == 200 else { throw KubeWatch.failure(answer, "creating a token") }
            return (token, stored)
        }
        throw PKIError(.writeFailed, "cannot create a token in \(location): every id taken")
    }

    public func deleteToken(id: String) async throws {
        let id = try BootstrapToken.validateID(id)
        let answer = try await client.request(.DELETE, "\(collection)/\(Self.tokenObjectName(id))")
        if answer.status == 404 { throw PKIError(.tokenNotFound, "no bootstrap token with id \"\(id)\" in \(location)") }
        guard answer.status == 200 || answer.status == 202 else { throw KubeWatch.failure(answer, "deleting token \(id)") }
    }

    public func recordJoin(_ name: String, ips: [String], certificateValidFrom: Date) async throws {
        let others = isSynced ? knownRecords : try await nodes()
        let record = try await update(name) { existing in
            try NodeRecord.joining(existing, name: name, ips: ips, certificateValidFrom: certificateValidFrom,
                                   others: others, now: Date())
        }
        // Seen at once by this replica (the node's HELLO may follow before the watch event).
        lock.withLock { cachedRecords[Self.nodeObjectName(name)] = record }
    }

    public func reset(_ name: String) async throws {
        _ = try DNSName.validateNodeName(name)
        _ = try await update(name) { NodeRecord.reset($0, name: name, now: Date()) }
    }

    public func revoke(_ name: String) async throws {
        _ = try DNSName.validateNodeName(name)
        _ = try await update(name) { NodeRecord.revoked($0, name: name, now: Date()) }
    }

    /// Reads the node's record, changes it and writes it back only if nobody wrote it meanwhile (create, or update
    /// with the read's resourceVersion); on a conflict, reads again.
    private func update(_ node: String, _ change: (NodeRecord?) throws -> NodeRecord) async throws -> NodeRecord {
        let objectName = Self.nodeObjectName(node)
        let path = "\(collection)/\(objectName)"
        for _ in 0..<8 {
            let current = try await client.request(.GET, path)
            let answer: KubeClient.Response
            let record: NodeRecord
            switch current.status {
            case 404:
                record = try change(nil)
                answer = try await client.request(.POST, collection, body: try configMap(objectName, kind: "node", key: "record", value: record))
            case 200:
                guard var object = try JSONSerialization.jsonObject(with: Data(current.body)) as? [String: Any] else {
                    throw PKIError(.invalidArgument, "ConfigMap \(namespace)/\(objectName) is not a JSON object")
                }
                record = try change(self.record(object as [String: any Sendable]))
                var data = object["data"] as? [String: Any] ?? [:]
                data["record"] = try Self.json(record)
                object["data"] = data
                answer = try await client.request(.PUT, path, body: Array(try JSONSerialization.data(withJSONObject: object)))
            default:
                throw KubeWatch.failure(current, "reading the record of node \(node)")
            }
            if answer.status == 409 { continue }
            guard (200...201).contains(answer.status) else { throw KubeWatch.failure(answer, "writing the record of node \(node)") }
            return record
        }
        throw PKIError(.writeFailed, "the record of node \(node) in \(location) keeps changing: try again")
    }

    // MARK: Objects

    private func list(_ kind: String) async throws -> [[String: any Sendable]] {
        let answer = try await client.request(.GET, "\(collection)?labelSelector=\(Self.label)%3D\(kind)")
        guard answer.status == 200 else { throw KubeWatch.failure(answer, "listing the \(kind)s in \(location)") }
        guard let object = try JSONSerialization.jsonObject(with: Data(answer.body)) as? [String: any Sendable],
            let items = object["items"] as? [[String: any Sendable]]
        else { throw KubeClient.Failure(description: "the list of \(kind)s in \(location) is not a list") }
        return items
    }

    private func configMap<T: Encodable>(_ name: String, kind: String, key: String, value: T) throws -> [UInt8] {
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
    private func record(_ object: [String: any Sendable]) -> NodeRecord? { decode(object, key: "record") }

    private func decode<T: Decodable>(_ object: [String: any Sendable], key: String) -> T? {
        guard let text = (object["data"] as? [String: any Sendable])?[key] as? String,
            let value = try? Self.decoder.decode(T.self, from: Data(text.utf8))
        else {
            logger.warning("ConfigMap \(namespace)/\(Self.name(object) ?? "?") has no valid \(key): ignored")
            return nil
        }
        return value
    }

    private static func json<T: Encodable>(_ value: T) throws -> String {
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
