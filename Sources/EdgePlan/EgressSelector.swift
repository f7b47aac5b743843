import TunnelSupport

/// kube-apiserver's `--egress-selector-config-file` for reaching nodes through EdgeTunnel
/// (`apiserver.k8s.io/v1beta1` `EgressSelectorConfiguration`), in either protocol the server speaks:
/// - `HTTPConnect` over TCP with the tunnel CA's client certificate (the secure port, 10263), or over a Unix socket
///   (the server's `--uds-path`);
/// - `GRPC`, konnectivity's protocol, over a Unix socket (the server's `--grpc-uds-path`), which is what a cluster
///   set up for konnectivity-server already has: moving to EdgeTunnel changes the binary, not this file.
///
/// The selection is `cluster`: kube-apiserver's connections to nodes, pods and Services go through the tunnel.
public struct EgressSelector: Sendable, Equatable {
    public enum Transport: Sendable, Equatable {
        /// `https://HOST:PORT` with the CA bundle and kube-apiserver's client certificate and key.
        case tcp(url: String, caBundle: String, clientCert: String, clientKey: String)
        case uds(path: String)
    }

    public enum ProxyProtocol: String, Sendable, CaseIterable {
        case httpConnect = "http-connect"
        case grpc

        var configurationName: String { self == .grpc ? "GRPC" : "HTTPConnect" }
    }

    public var proxyProtocol: ProxyProtocol
    public var transport: Transport

    /// Where the TLS files go on the control plane, as the README's tour copies them.
    public static let defaultFolder = "/etc/kubernetes/edge-tunnel"
    /// The socket the server's `--grpc-uds-path` or `--uds-path` creates on the control plane host.
    public static let defaultSocket = "/etc/kubernetes/edge-tunnel/edge-tunnel.socket"

    /// Checks the combination: GRPC has only a Unix socket transport (kube-apiserver refuses GRPC over TCP), and
    /// TCP needs an `https://HOST:PORT` URL.
    public init(proxyProtocol: ProxyProtocol, url: String?, uds: String?, folder: String = defaultFolder) throws {
        self.proxyProtocol = proxyProtocol
        switch (proxyProtocol, url, uds) {
        case (_, .some, .some):
            throw PlanError("give --egress-url or --egress-uds, not both")
        case (.grpc, .some, nil):
            throw PlanError("--egress grpc runs over a Unix socket only (kube-apiserver's rule): use --egress-uds PATH")
        case (_, nil, let path):
            let path = path ?? Self.defaultSocket
            guard path.hasPrefix("/"), !path.contains("\n"), path.utf8.count < 108 else {
                throw PlanError("invalid --egress-uds \"\(path.prefix(200))\": expected an absolute socket path")
            }
            if proxyProtocol == .httpConnect && uds == nil {
                throw PlanError(
                    "--egress http-connect needs --egress-url https://ADDRESS:10263 (the ClusterIP of "
                        + "x-tunnel-server-internal-svc) or --egress-uds PATH (the server's --uds-path)")
            }
            transport = .uds(path: path)
        case (.httpConnect, .some(let url), nil):
            guard url.hasPrefix("https://"), HostPort(authority: String(url.dropFirst("https://".count))) != nil
            else {
                throw PlanError("invalid --egress-url \"\(url.prefix(200))\": expected https://HOST:PORT")
            }
            transport = .tcp(
                url: url, caBundle: "\(folder)/ca.crt", clientCert: "\(folder)/kube-apiserver.crt",
                clientKey: "\(folder)/kube-apiserver.key")
        }
    }

    /// The configuration file's YAML.
    public var yaml: String {
        var text = """
            # kube-apiserver --egress-selector-config-file: its connections to nodes, pods and Services go through
            # EdgeTunnel (\(proxyProtocol.configurationName)).
            apiVersion: apiserver.k8s.io/v1beta1
            kind: EgressSelectorConfiguration
            egressSelections:
            - name: cluster
              connection:
                proxyProtocol: \(proxyProtocol.configurationName)
                transport:

            """
        switch transport {
        case .uds(let path):
            text += """
                      uds:
                        udsName: \(path)

                """
        case .tcp(let url, let caBundle, let clientCert, let clientKey):
            text += """
                      tcp:
                        url: \(url)
                        tlsConfig:
                          caBundle: \(caBundle)
                          clientCert: \(clientCert)
                          clientKey: \(clientKey)

                """
        }
        return text
    }
}
