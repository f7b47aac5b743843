import Crypto
import Foundation

/// A bootstrap token in kubeadm's form `[a-z0-9]{6}.[a-z0-9]{16}`: a public id and a secret.
public struct BootstrapToken: Hashable, Sendable, CustomStringConvertible {
    public let id: String
    public let secret: String

    private static let alphabet = Array("abcdefghijklmnopqrstuvwxyz0123456789")

    /// A new random token (from the system's cryptographic random source).
    public static func generate() -> BootstrapToken {
        var rng = SystemRandomNumberGenerator()
        func random(_ count: Int) -> String {
            String((0..<count).map { _ in alphabet.randomElement(using: &rng)! })
        }
        return BootstrapToken(id: random(6), secret: random(16))
    }

    private init(id: String, secret: String) {
        self.id = id
        self.secret = secret
    }

    /// Parses `id.secret`; the error never repeats the secret.
    public init(parsing text: String) throws {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 2, Self.isToken(parts[0], length: 6), Self.isToken(parts[1], length: 16) else {
            throw PKIError(.invalidToken, "malformed bootstrap token: expected the form [a-z0-9]{6}.[a-z0-9]{16}")
        }
        self.init(id: String(parts[0]), secret: String(parts[1]))
    }

    /// Checks a token id (the part before the dot).
    public static func validateID(_ id: String) throws -> String {
        guard isToken(Substring(id), length: 6) else {
            throw PKIError(.invalidToken, "malformed token id \"\(id)\": expected 6 characters [a-z0-9]")
        }
        return id
    }

    private static func isToken(_ text: Substring, length: Int) -> Bool {
        text.utf8.count == length
            && text.utf8.allSatisfy {
                ($0 >= UInt8(ascii: "a") && $0 <= UInt8(ascii: "z"))
                    || ($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9"))
            }
    }

    public var description: String { "\(id).\(secret)" }

    /// What is stored instead of the secret.
    var hash: String { "sha256:" + SHA256.hash(data: Array(description.utf8)).hexString }
}

/// One stored token: never the secret, only its hash.
public struct StoredToken: Codable, Hashable, Sendable {
    public var id: String
    public var secretHash: String
    public var created: Date
    /// `nil`: the token never expires (`--ttl 0`).
    public var expires: Date?
    public var description: String?
    /// The node names this token may join: exact names, or a prefix ending in `*` (`edge-*`). `nil`: any name.
    public var nodes: [String]?
    /// The networks whose addresses a node joining with this token may name as its node IPs (they become its
    /// certificate's IP SANs). `nil` or empty: no node IPs.
    public var nodeCIDRs: [String]?

    public func isExpired(at now: Date) -> Bool {
        if let expires { return expires <= now }
        return false
    }

    /// Whether a node named `name` may join with this token.
    public func allows(node name: String) -> Bool {
        guard let nodes else { return true }
        return nodes.contains { pattern in
            pattern.hasSuffix("*") ? name.hasPrefix(pattern.dropLast()) : name == pattern
        }
    }

    /// Checks that every one of `ips` lies in the token's networks, or throws an error naming the first that
    /// does not.
    public func checkNodeIPs(_ ips: [IPAddress]) throws {
        let networks = try (nodeCIDRs ?? []).map { try CIDR(parsing: $0) }
        for ip in ips where !networks.contains(where: { $0.contains(ip) }) {
            throw PKIError(
                .invalidArgument,
                networks.isEmpty
                    ? "bootstrap token \(id) allows no node IPs (\(ip) was asked for): create it with --node-cidr"
                    : "node IP \(ip) is outside the networks of bootstrap token \(id) (\(networks.map(\.description).joined(separator: ", ")))"
            )
        }
    }

    /// Checks a `--node` pattern: a node name, or a prefix of one followed by `*`.
    public static func validateNodePattern(_ pattern: String) throws -> String {
        let name = pattern.hasSuffix("*") ? String(pattern.dropLast()) : pattern
        guard !name.isEmpty || pattern == "*", !name.contains("*"),
            name.utf8.allSatisfy({ ($0 >= 97 && $0 <= 122) || ($0 >= 48 && $0 <= 57) || $0 == 45 || $0 == 46 }),
            pattern.hasSuffix("*") || DNSName.isValid(name)
        else {
            throw PKIError(
                .invalidNodeName,
                "invalid --node \"\(pattern)\": a node name, or the start of one followed by * (edge-*)")
        }
        return pattern
    }
}

/// The bootstrap tokens of a PKI folder, kept in `tokens.json` (mode 0600) and rewritten atomically.
public struct TokenStore: Sendable {
    private struct File: Codable {
        var tokens: [StoredToken]
    }

    public let path: String

    public init(path: String) { self.path = path }
    public init(paths: PKIPaths) { self.path = paths.tokens }

    /// All stored tokens, expired ones included; none when the file does not exist yet.
    public func list() throws -> [StoredToken] {
        try PrivateJSONFile.read(File.self, from: path, what: "token file")?.tokens ?? []
    }

    /// Creates and stores a new token that expires after `ttl` seconds (0: never).
    public func create(
        ttl: Double, description: String? = nil, nodes: [String]? = nil, nodeCIDRs: [String]? = nil, now: Date = Date()
    ) throws -> (BootstrapToken, StoredToken) {
        var tokens = try list()
        let (token, stored) = try Self.make(
            ttl: ttl, description: description, nodes: nodes, nodeCIDRs: nodeCIDRs, taken: Set(tokens.map(\.id)),
            now: now)
        tokens.append(stored)
        try save(tokens)
        return (token, stored)
    }

    /// A new token and what is stored of it (its hash), with an id not in `taken`; checks the patterns and
    /// networks. Every store of tokens (this file, the Kubernetes objects) makes them here.
    public static func make(
        ttl: Double, description: String?, nodes: [String]?, nodeCIDRs: [String]?, taken: Set<String>, now: Date
    ) throws -> (BootstrapToken, StoredToken) {
        let nodes = try nodes.map { try $0.map(StoredToken.validateNodePattern) }
        let nodeCIDRs = try nodeCIDRs.map { try $0.map { try CIDR(parsing: $0).description } }
        // Whole seconds: what is returned is exactly what the store holds.
        let now = Date(timeIntervalSince1970: now.timeIntervalSince1970.rounded(.down))
        var token = BootstrapToken.generate()
        while taken.contains(token.id) { token = .generate() }
        let stored = StoredToken(
            id: token.id,
            secretHash: token.hash,
            created: now,
            expires: ttl > 0 ? now.addingTimeInterval(ttl) : nil,
            description: description,
            nodes: nodes,
            nodeCIDRs: nodeCIDRs
        )
        return (token, stored)
    }

    /// Deletes the token with `id`; throws `tokenNotFound` when there is none.
    public func delete(id: String) throws {
        let id = try BootstrapToken.validateID(id)
        var tokens = try list()
        guard let index = tokens.firstIndex(where: { $0.id == id }) else {
            throw PKIError(.tokenNotFound, "no bootstrap token with id \"\(id)\" in \(path)")
        }
        tokens.remove(at: index)
        try save(tokens)
    }

    /// Checks a presented token: well-formed, known, secret matching (in constant time), not expired.
    /// The error says which, without echoing the secret.
    @discardableResult
    public func verify(_ presented: String, now: Date = Date()) throws -> StoredToken {
        try Self.verify(presented, among: try list(), now: now)
    }

    /// ``verify(_:now:)`` against tokens already read (a server keeps them in memory between changes of the file).
    public static func verify(
        _ presented: String, among tokens: [StoredToken], now: Date = Date()
    ) throws -> StoredToken {
        let token = try BootstrapToken(parsing: presented)
        guard let stored = tokens.first(where: { $0.id == token.id }) else {
            throw PKIError(.tokenNotFound, "bootstrap token \"\(token.id)\" is not known")
        }
        guard Array(stored.secretHash.utf8).equalsInConstantTime(Array(token.hash.utf8)) else {
            throw PKIError(.invalidToken, "bootstrap token \"\(token.id)\" has a wrong secret")
        }
        guard !stored.isExpired(at: now) else {
            throw PKIError(.tokenExpired, "bootstrap token \"\(token.id)\" has expired")
        }
        return stored
    }

    private func save(_ tokens: [StoredToken]) throws {
        try PrivateJSONFile.write(File(tokens: tokens), to: path)
    }
}

extension Array where Element == UInt8 {
    /// Equal, in a time that depends on the lengths only (secrets and tokens compared with what a peer sent).
    public func equalsInConstantTime(_ other: [UInt8]) -> Bool {
        guard count == other.count else { return false }
        var difference: UInt8 = 0
        for index in indices { difference |= self[index] ^ other[index] }
        return difference == 0
    }
}
