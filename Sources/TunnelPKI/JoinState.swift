import Foundation

/// Where bootstrap tokens and node records live, for everyone who changes them: the server at a join, the
/// operator's `edgetunnel token` and `edgetunnel node`. Two stores: a PKI folder (``FileJoinState``, shared by
/// replicas that share the folder) and Kubernetes objects that every replica watches (`KubeJoinState`). Both make
/// the same decisions (``TokenStore/make``, ``NodeRecord/joining``).
public protocol JoinStateStore: Sendable {
    /// Where the state is kept, for messages (`/var/lib/…/pki`, `namespace edge-tunnel`).
    var location: String { get }
    func tokens() async throws -> [StoredToken]
    func createToken(
        ttl: Double, description: String?, nodes: [String]?, nodeCIDRs: [String]?
    ) async throws
        -> (BootstrapToken, StoredToken)
    /// Throws `tokenNotFound` when there is no token with `id`.
    func deleteToken(id: String) async throws
    func nodes() async throws -> [NodeRecord]
    func recordJoin(_ name: String, ips: [String], certificateValidFrom: Date) async throws
    func reset(_ name: String) async throws
    func revoke(_ name: String) async throws
}

/// The join state in a PKI folder: `tokens.json` and `nodes.json`.
public struct FileJoinState: JoinStateStore {
    public let paths: PKIPaths

    public init(paths: PKIPaths) { self.paths = paths }

    public var location: String { paths.directory }
    public func tokens() throws -> [StoredToken] { try TokenStore(paths: paths).list() }
    public func createToken(
        ttl: Double, description: String?, nodes: [String]?, nodeCIDRs: [String]?
    ) throws
        -> (BootstrapToken, StoredToken)
    {
        try TokenStore(paths: paths).create(ttl: ttl, description: description, nodes: nodes, nodeCIDRs: nodeCIDRs)
    }
    public func deleteToken(id: String) throws { try TokenStore(paths: paths).delete(id: id) }
    public func nodes() throws -> [NodeRecord] { try NodeStore(paths: paths).list() }
    public func recordJoin(_ name: String, ips: [String], certificateValidFrom: Date) throws {
        try NodeStore(paths: paths).recordJoin(name, ips: ips, certificateValidFrom: certificateValidFrom)
    }
    public func reset(_ name: String) throws { try NodeStore(paths: paths).reset(name) }
    public func revoke(_ name: String) throws { try NodeStore(paths: paths).revoke(name) }
}
