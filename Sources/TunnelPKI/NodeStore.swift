import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// What the server knows of one node's identity: when it joined, whether it is revoked, and from when its
/// certificates count (``certificatesValidFrom``: a reset makes every earlier certificate of the name void).
public struct NodeRecord: Codable, Hashable, Sendable {
    public var name: String
    /// When the node last joined; `nil` after a reset until it joins again.
    public var joined: Date?
    /// The node IPs its certificate names (IP SANs), as issued at its join.
    public var ips: [String]
    /// Certificates of this name issued before this moment are refused (set by a reset and a revocation).
    public var certificatesValidFrom: Date?
    /// Set by `edgetunnel node revoke`: the node may neither connect, renew nor join until it is reset.
    public var revoked: Date?

    /// Whether a certificate of this node, valid from `notValidBefore`, may be used now.
    public func accepts(certificateValidFrom notValidBefore: Date) -> Bool {
        guard revoked == nil else { return false }
        guard let from = certificatesValidFrom else { return true }
        // Certificates are back-dated by the CA's clock-skew margin.
        return notValidBefore.addingTimeInterval(CertificateAuthority.backdate) >= from
    }
}

/// The decisions every store of node records (`nodes.json`, the Kubernetes objects) makes alike.
extension NodeRecord {
    /// The record after a join of `name` with `ips`, whose certificate counts from `certificateValidFrom`.
    /// Refuses a name that has joined and was not reset, or is revoked; node IPs that another joined node
    /// (among `others`) holds; and a join that a reset overtook (its certificate would already be void).
    public static func joining(
        _ existing: NodeRecord?, name: String, ips: [String], certificateValidFrom: Date, others: [NodeRecord],
        now: Date
    ) throws -> NodeRecord {
        for other in others where other.name != name && other.joined != nil && other.revoked == nil {
            if let shared = ips.first(where: other.ips.contains) {
                throw PKIError(.alreadyExists, "node IP \(shared) belongs to node \(other.name)")
            }
        }
        guard var record = existing else { return NodeRecord(name: name, joined: now, ips: ips) }
        if record.revoked != nil {
            throw PKIError(
                .alreadyExists, "node \(name) is revoked: run edgetunnel node reset \(name) before it joins again")
        }
        if record.joined != nil {
            throw PKIError(
                .alreadyExists,
                "node \(name) has already joined: if it was re-installed, run edgetunnel node reset \(name) first")
        }
        guard record.accepts(certificateValidFrom: certificateValidFrom) else {
            throw PKIError(.alreadyExists, "node \(name) was reset while it joined: join again")
        }
        record.joined = now
        record.ips = ips
        return record
    }

    /// The record after a reset: the name may join again, every certificate issued so far is void.
    public static func reset(_ existing: NodeRecord?, name: String, now: Date) -> NodeRecord {
        var record = voidingCertificates(existing, name: name, now: now)
        record.joined = nil
        record.revoked = nil
        record.ips = []
        return record
    }

    /// The record after a revocation.
    public static func revoked(_ existing: NodeRecord?, name: String, now: Date) -> NodeRecord {
        var record = voidingCertificates(existing, name: name, now: now)
        record.revoked = now
        return record
    }

    private static func voidingCertificates(_ existing: NodeRecord?, name: String, now: Date) -> NodeRecord {
        // A node that joined before its store existed (or is unknown): its record starts here.
        var record = existing ?? NodeRecord(name: name, joined: nil, ips: [])
        // Whole seconds, as certificates carry them, rounded up: every certificate issued so far, even in this
        // second, is void. Certificates issued later start no earlier than this (``NodeIdentities``).
        record.certificatesValidFrom = Date(timeIntervalSince1970: now.timeIntervalSince1970.rounded(.up))
        return record
    }
}

/// The node identities of a PKI folder, in `nodes.json` (mode 0600), rewritten atomically.
///
/// A bootstrap token is shared by every agent of a DaemonSet, so whoever holds it could otherwise join under
/// any node name and replace that node's tunnel. Once a name has joined, a join for it is refused until an
/// operator runs `edgetunnel node reset NAME` (the node was re-imaged); `revoke` also cuts off the node's live
/// tunnel and certificate.
public struct NodeStore: Sendable {
    private struct File: Codable {
        var nodes: [NodeRecord]
    }

    public let path: String

    public init(paths: PKIPaths) { self.path = paths.nodes }

    /// Every node record; none when the file does not exist yet.
    public func list() throws -> [NodeRecord] {
        try PrivateJSONFile.read(File.self, from: path, what: "node file")?.nodes ?? []
    }

    public func record(_ name: String) throws -> NodeRecord? {
        try list().first { $0.name == name }
    }

    /// Records a join of `name` with `ips`, whose certificate counts from `certificateValidFrom`. Refuses a name
    /// that has joined and was not reset, or is revoked; node IPs that another joined node holds; and a join
    /// that a reset overtook (its certificate would already be void).
    public func recordJoin(_ name: String, ips: [String], certificateValidFrom: Date, now: Date = Date()) throws {
        try withFileLock {
            var nodes = try list()
            let record = try NodeRecord.joining(
                nodes.first { $0.name == name }, name: name, ips: ips, certificateValidFrom: certificateValidFrom,
                others: nodes, now: now)
            nodes.removeAll { $0.name == name }
            nodes.append(record)
            try save(nodes)
        }
    }

    /// Lets `name` join again and voids every certificate issued to it so far (and lifts a revocation).
    public func reset(_ name: String, now: Date = Date()) throws {
        try update(name) { NodeRecord.reset($0, name: name, now: now) }
    }

    /// Cuts `name` off: its certificates are refused at the handshake and at renewal, its live tunnel is closed,
    /// and it may not join until it is reset.
    public func revoke(_ name: String, now: Date = Date()) throws {
        try update(name) { NodeRecord.revoked($0, name: name, now: now) }
    }

    private func update(_ name: String, _ change: (NodeRecord?) -> NodeRecord) throws {
        _ = try DNSName.validateNodeName(name)
        try withFileLock {
            var nodes = try list()
            let record = change(nodes.first { $0.name == name })
            nodes.removeAll { $0.name == name }
            nodes.append(record)
            try save(nodes)
        }
    }

    /// Read, change and write under an exclusive lock on `nodes.json.lock`, so that the server's joins and the
    /// operator's `edgetunnel node` commands (and servers sharing the folder) never overwrite each other.
    private func withFileLock<T>(_ body: () throws -> T) throws -> T {
        try AtomicFile.makeDirectory(FilePath.directory(of: path), mode: 0o700)
        let fd = open(path + ".lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw PKIError(.writeFailed, "cannot open \(path).lock (errno \(errno))") }
        defer { close(fd) }
        while flock(fd, LOCK_EX) != 0 {
            guard errno == EINTR else { throw PKIError(.writeFailed, "cannot lock \(path).lock (errno \(errno))") }
        }
        return try body()
    }

    private func save(_ nodes: [NodeRecord]) throws {
        try PrivateJSONFile.write(File(nodes: nodes.sorted { $0.name < $1.name }), to: path)
    }
}
