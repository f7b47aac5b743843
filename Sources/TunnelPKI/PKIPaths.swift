/// The files of a PKI folder.
///
/// The server's folder defaults to `/var/lib/edge-tunnel-server/pki` (the path the source document names);
/// an agent keeps its own credentials under `/var/lib/edge-tunnel-agent/pki`.
public struct PKIPaths: Sendable, Hashable {
    public static let defaultServerDirectory = "/var/lib/edge-tunnel-server/pki"
    public static let defaultAgentDirectory = "/var/lib/edge-tunnel-agent/pki"

    public let directory: String

    public init(directory: String) {
        var trimmed = directory
        while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed.removeLast() }
        self.directory = trimmed
    }

    public var caCertificate: String { file("ca.crt") }
    public var caKey: String { file("ca.key") }
    public var serverCertificate: String { file("server.crt") }
    public var serverKey: String { file("server.key") }
    /// Bootstrap tokens, hashed.
    public var tokens: String { file("tokens.json") }
    /// Nodes that have joined, been reset or revoked (``NodeStore``).
    public var nodes: String { file("nodes.json") }
    /// An agent's node certificate and key.
    public var agentCertificate: String { file("agent.crt") }
    public var agentKey: String { file("agent.key") }

    public func file(_ name: String) -> String { "\(directory)/\(name)" }
}
