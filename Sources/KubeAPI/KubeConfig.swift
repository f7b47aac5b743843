import Foundation
import NIOCore
import NIOSSL
import TunnelSupport

/// Where the Kubernetes API is and how to authenticate: in a pod from its service account, elsewhere from a
/// kubeconfig file. The bearer token is read from its file before every request: projected service-account
/// tokens rotate (hourly by default) and a token read once would expire.
public struct KubeConfig: Sendable {
    public var host: String
    public var port: Int
    /// PEM of the CA that signed the API server's certificate; nil: the system's roots.
    public var caPEM: [UInt8]?
    public var token: String?
    public var tokenFile: String?
    /// PEM client certificate and key (kubeconfig `client-certificate-data` / `client-key-data`).
    public var clientCertificatePEM: [UInt8]?
    public var clientKeyPEM: [UInt8]?
    /// The namespace of the pod (in cluster), or the kubeconfig context's.
    public var namespace: String?

    public struct Invalid: Error, CustomStringConvertible {
        public let description: String
    }

    public static let serviceAccount = "/var/run/secrets/kubernetes.io/serviceaccount"

    /// In a pod: `KUBERNETES_SERVICE_HOST`/`_PORT`, the service account's token, CA and namespace.
    public static func inCluster(
        environment: [String: String] = ProcessInfo.processInfo.environment,
        directory: String = serviceAccount
    ) throws -> KubeConfig {
        guard let host = environment["KUBERNETES_SERVICE_HOST"], let portText = environment["KUBERNETES_SERVICE_PORT"],
            let port = Int(portText)
        else {
            throw Invalid(
                description: "not in a Kubernetes pod: KUBERNETES_SERVICE_HOST/PORT are not set (use --kubeconfig)")
        }
        let namespace = (try? String(contentsOfFile: directory + "/namespace", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines)
        return KubeConfig(
            host: host, port: port, caPEM: try? readFile(directory + "/ca.crt"), token: nil,
            tokenFile: directory + "/token", namespace: namespace)
    }

    /// The current context of a kubeconfig file: its cluster's server and CA, its user's token, token file or
    /// client certificate.
    public static func kubeconfig(path: String) throws -> KubeConfig {
        let text = String(decoding: try readFile(path), as: UTF8.self)
        guard let root = try SafeYAML.load(text) as? [String: Any] else {
            throw Invalid(description: "\(path): not a kubeconfig (no mapping at the top)")
        }
        func named(_ key: String, _ name: String?) -> [String: Any]? {
            let entries = root[key] as? [[String: Any]] ?? []
            let entry = name.flatMap { n in entries.first { $0["name"] as? String == n } } ?? entries.first
            return entry?[String(key.dropLast())] as? [String: Any]
        }
        let contextName = root["current-context"] as? String
        let context = named("contexts", contextName)
        guard let cluster = named("clusters", context?["cluster"] as? String),
            let server = cluster["server"] as? String, let url = URLComponents(string: server),
            url.scheme == "https", let host = url.host
        else {
            throw Invalid(description: "\(path): the current context has no cluster with an https server")
        }
        let user = named("users", context?["user"] as? String) ?? [:]
        func data(_ value: Any?) throws -> [UInt8]? {
            guard let text = value as? String else { return nil }
            guard let decoded = Data(base64Encoded: text) else {
                throw Invalid(description: "\(path): a *-data field is not base64")
            }
            return Array(decoded)
        }
        func file(_ value: Any?) throws -> [UInt8]? {
            guard let name = value as? String else { return nil }
            let resolved = name.hasPrefix("/") ? name : (path as NSString).deletingLastPathComponent + "/" + name
            return try readFile(resolved)
        }
        return KubeConfig(
            host: host.trimmingCharacters(in: CharacterSet(charactersIn: "[]")), port: url.port ?? 443,
            caPEM: try data(cluster["certificate-authority-data"]) ?? file(cluster["certificate-authority"]),
            token: user["token"] as? String, tokenFile: user["tokenFile"] as? String,
            clientCertificatePEM: try data(user["client-certificate-data"]) ?? file(user["client-certificate"]),
            clientKeyPEM: try data(user["client-key-data"]) ?? file(user["client-key"]),
            namespace: context?["namespace"] as? String)
    }

    /// The bearer token now (re-read from its file each time), if any.
    func currentToken() throws -> String? {
        if let tokenFile {
            return String(decoding: try readFile(tokenFile), as: UTF8.self).trimmingCharacters(
                in: .whitespacesAndNewlines)
        }
        return token
    }

    /// How long closing a connection waits for the API server's TLS close_notify. Each request has its own connection
    /// and closes it once the answer is complete (its framing says so), so nothing is read after our close_notify;
    /// swift-nio-ssl's default of 5 s only held the socket, and at shutdown it held the process: the event loops
    /// wait for every channel, so a server with `--kubeconfig` took 5 s to exit on SIGTERM.
    static let closeNotifyWait: TimeAmount = .milliseconds(100)

    func tlsContext() throws -> NIOSSLContext {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.shutdownTimeout = Self.closeNotifyWait
        if let caPEM {
            tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(caPEM))
        }
        if let clientCertificatePEM, let clientKeyPEM {
            tls.certificateChain = try NIOSSLCertificate.fromPEMBytes(clientCertificatePEM).map { .certificate($0) }
            tls.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: clientKeyPEM, format: .pem))
        }
        return try NIOSSLContext(configuration: tls)
    }
}

/// A file's bytes (a failure names the file).
func readFile(_ path: String) throws -> [UInt8] {
    do {
        return Array(try Data(contentsOf: URL(fileURLWithPath: path)))
    } catch {
        throw KubeConfig.Invalid(description: "cannot read \(path): \(error.localizedDescription)")
    }
}
