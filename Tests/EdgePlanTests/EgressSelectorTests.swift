import Testing
import Yams

@testable import EdgePlan

/// `edgetunnel manifests --egress`: kube-apiserver's EgressSelectorConfiguration, read back as YAML and checked
/// field by field against the API's schema (apiserver.k8s.io/v1beta1), for both protocols and both transports.
@Suite struct EgressSelectorTests {
    func connection(_ selector: EgressSelector) throws -> [String: Any] {
        let document = try #require(try Yams.load(yaml: selector.yaml) as? [String: Any])
        #expect(document["apiVersion"] as? String == "apiserver.k8s.io/v1beta1")
        #expect(document["kind"] as? String == "EgressSelectorConfiguration")
        let selections = try #require(document["egressSelections"] as? [[String: Any]])
        #expect(selections.count == 1)
        #expect(selections[0]["name"] as? String == "cluster")
        return try #require(selections[0]["connection"] as? [String: Any])
    }

    @Test func grpcIsAUnixSocket() throws {
        let connection = try connection(EgressSelector(proxyProtocol: .grpc, url: nil, uds: "/run/et/grpc.sock"))
        #expect(connection["proxyProtocol"] as? String == "GRPC")
        let transport = try #require(connection["transport"] as? [String: Any])
        #expect((transport["uds"] as? [String: Any])?["udsName"] as? String == "/run/et/grpc.sock")
        let byDefault = try self.connection(EgressSelector(proxyProtocol: .grpc, url: nil, uds: nil))
        let udsName = ((byDefault["transport"] as? [String: Any])?["uds"] as? [String: Any])?["udsName"] as? String
        #expect(udsName == EgressSelector.defaultSocket)
    }

    @Test func httpConnectOverTCPCarriesTheClientCertificate() throws {
        let connection = try connection(
            EgressSelector(proxyProtocol: .httpConnect, url: "https://10.96.0.20:10263", uds: nil))
        #expect(connection["proxyProtocol"] as? String == "HTTPConnect")
        let tcp = try #require((connection["transport"] as? [String: Any])?["tcp"] as? [String: Any])
        #expect(tcp["url"] as? String == "https://10.96.0.20:10263")
        let tls = try #require(tcp["tlsConfig"] as? [String: String])
        #expect(
            tls == [
                "caBundle": "/etc/kubernetes/edge-tunnel/ca.crt",
                "clientCert": "/etc/kubernetes/edge-tunnel/kube-apiserver.crt",
                "clientKey": "/etc/kubernetes/edge-tunnel/kube-apiserver.key",
            ])
        let overUDS = try self.connection(EgressSelector(proxyProtocol: .httpConnect, url: nil, uds: "/run/et.sock"))
        #expect(overUDS["proxyProtocol"] as? String == "HTTPConnect")
    }

    /// Combinations kube-apiserver refuses, or that could not reach the server, are refused with one line.
    @Test(
        arguments: [
            (EgressSelector.ProxyProtocol.grpc, "https://10.0.0.1:10263", nil, "Unix socket only"),
            (.httpConnect, nil, nil, "needs --egress-url"),
            (.httpConnect, "http://10.0.0.1:10263", nil, "invalid --egress-url"),
            (.httpConnect, "https://10.0.0.1", nil, "invalid --egress-url"),
            (.grpc, nil, "relative.sock", "invalid --egress-uds"),
            (.grpc, nil, "/" + String(repeating: "a", count: 120), "invalid --egress-uds"),
            (.grpc, "https://10.0.0.1:1", "/run/x.sock", "not both"),
        ] as [(EgressSelector.ProxyProtocol, String?, String?, String)])
    func aBadCombinationIsRefused(proto: EgressSelector.ProxyProtocol, url: String?, uds: String?, words: String) {
        let error = #expect(throws: PlanError.self) { _ = try EgressSelector(proxyProtocol: proto, url: url, uds: uds) }
        let message = error.map { String(describing: $0) } ?? ""
        #expect(message.contains(words), "\(message)")
        #expect(!message.contains("\n"))
    }
}
