import TunnelPKI
import TunnelSupport
import TunnelWire
import Yams

/// The YAML configuration file: the flags in camelCase, as Kubernetes component configs write them.
public struct ServerConfigFile: Codable, Sendable {
    public var pkiDir: String?
    public var caDir: String?
    public var stateDir: String?
    public var bindAddress: String?
    public var tunnelPort: Int?
    public var securePort: Int?
    public var metaPort: Int?
    public var certIPs: [String]?
    public var certDNSNames: [String]?
    public var clientCAFile: String?
    public var serverID: String?
    public var serverCount: Int?
    public var replicaWarmup: String?
    public var leaseNamespace: String?
    public var leaseLabel: String?
    public var kubeconfig: String?
    public var addressService: String?
    public var checkNodeObjects: Bool?
    public var poolLabel: String?
    public var joinStateNamespace: String?
    public var logLevel: String?
    public var agentCertificateValidity: String?
    public var servingCertificateValidity: String?
    public var insecurePort: Int?
    public var insecureBindAddress: String?
    public var udsPath: String?
    public var grpcUdsPath: String?
    public var kubeletClientCert: String?
    public var kubeletClientKey: String?
    public var kubeletCAFile: String?
    public var eventLoopThreads: Int?
    public var handshakeTimeout: String?
    public var maxPendingConnections: Int?
    public var maxPendingConnectionsPerSource: Int?
    public var allowInsecureBind: Bool?
    public var maxStreamsPerAgent: Int?
    public var maxPendingOpensPerAgent: Int?
    public var maxStreamsPerCaller: Int?
    public var maxBufferedMiB: Int?
    public var resumeGraceSeconds: Int?

    public static let keys: Set<String> = [
        "pkiDir", "caDir", "stateDir", "bindAddress", "tunnelPort", "securePort", "metaPort", "certIPs", "certDNSNames",
        "clientCAFile",
        "serverID", "serverCount", "replicaWarmup", "leaseNamespace", "leaseLabel", "kubeconfig", "addressService",
        "checkNodeObjects", "poolLabel", "joinStateNamespace", "logLevel", "agentCertificateValidity",
        "servingCertificateValidity", "insecurePort",
        "insecureBindAddress", "udsPath", "grpcUdsPath", "kubeletClientCert", "kubeletClientKey", "kubeletCAFile",
        "eventLoopThreads", "handshakeTimeout", "maxPendingConnections", "maxPendingConnectionsPerSource",
        "allowInsecureBind", "maxStreamsPerAgent", "maxPendingOpensPerAgent", "maxStreamsPerCaller", "maxBufferedMiB",
        "resumeGraceSeconds",
    ]

    public init() {}

    /// Reads and checks a config file: unknown keys are errors (a typo must not be silently ignored).
    public static func load(path: String) throws -> ServerConfigFile {
        try parse(String(decoding: try AtomicFile.read(path), as: UTF8.self), path: path)
    }

    /// Checks the text of a config file; errors name `path` and the setting.
    public static func parse(_ text: String, path: String) throws -> ServerConfigFile {
        let node: Any?
        do {
            node = try SafeYAML.load(text)
        } catch {
            throw ConfigurationError("\(path): not valid YAML (\(error))")
        }
        guard let node else { return ServerConfigFile() }
        guard let map = node as? [String: Any] else {
            throw ConfigurationError("\(path): expected a mapping of settings")
        }
        if let unknown = map.keys.sorted().first(where: { !keys.contains($0) }) {
            throw ConfigurationError("\(path): unknown setting \"\(unknown)\"")
        }
        do {
            return try YAMLDecoder().decode(ServerConfigFile.self, from: text)
        } catch let DecodingError.typeMismatch(_, context), let DecodingError.dataCorrupted(context) {
            let key = context.codingPath.map(\.stringValue).joined(separator: ".")
            throw ConfigurationError("\(path): setting \"\(key)\" has the wrong type")
        } catch {
            throw ConfigurationError("\(path): \(PeerText.bounded("\(error)"))")
        }
    }
}
