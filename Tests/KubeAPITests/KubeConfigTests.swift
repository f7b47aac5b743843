import Foundation
import Testing

@testable import KubeAPI

/// Where the Kubernetes API is and how to reach it: kubeconfig files as kubectl writes them, and a pod's service
/// account.
@Suite struct KubeConfigTests {
    func write(_ text: String) throws -> String {
        let path = NSTemporaryDirectory() + "kubeconfig-\(UUID().uuidString)"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test func theCurrentContextPicksClusterAndUser() throws {
        let ca = Data("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n".utf8).base64EncodedString()
        let path = try write(
            """
            apiVersion: v1
            kind: Config
            current-context: two
            clusters:
            - name: a
              cluster: {server: "https://10.0.0.1:6443"}
            - name: b
              cluster: {server: "https://[fd00::1]:8443", certificate-authority-data: \(ca)}
            users:
            - name: u1
              user: {token: first}
            - name: u2
              user: {token: second}
            contexts:
            - name: one
              context: {cluster: a, user: u1}
            - name: two
              context: {cluster: b, user: u2, namespace: edge}
            """)
        let config = try KubeConfig.kubeconfig(path: path)
        #expect(config.host == "fd00::1" && config.port == 8443 && config.namespace == "edge")
        #expect(try config.currentToken() == "second")
        #expect(config.caPEM.map { String(decoding: $0, as: UTF8.self) }?.hasPrefix("-----BEGIN CERTIFICATE") == true)
    }

    @Test func aTokenFileIsReadForEveryRequest() throws {
        let token = NSTemporaryDirectory() + "token-\(UUID().uuidString)"
        try "one\n".write(toFile: token, atomically: true, encoding: .utf8)
        let path = try write(
            """
            clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
            users: [{name: u, user: {tokenFile: \(token)}}]
            contexts: [{name: x, context: {cluster: c, user: u}}]
            current-context: x
            """)
        let config = try KubeConfig.kubeconfig(path: path)
        #expect(try config.currentToken() == "one")
        try "two\n".write(toFile: token, atomically: true, encoding: .utf8)
        #expect(try config.currentToken() == "two")  // rotated: read anew
    }

    @Test func whatCannotWorkIsSaidInOneLine() throws {
        let plain = try write(
            "clusters: [{name: c, cluster: {server: \"http://127.0.0.1:8080\"}}]\ncurrent-context: x\n")
        #expect(throws: KubeConfig.Invalid.self) { try KubeConfig.kubeconfig(path: plain) }
        #expect(throws: KubeConfig.Invalid.self) { try KubeConfig.kubeconfig(path: "/nonexistent/kubeconfig") }
        let error = #expect(throws: KubeConfig.Invalid.self) { try KubeConfig.inCluster(environment: [:]) }
        #expect(error?.description.contains("--kubeconfig") == true)
    }

    @Test func leaseTimesAreMicroTimes() throws {
        let date = Date(timeIntervalSince1970: 1_800_000_000.123)
        let text = ReplicaLeases.microTime(date)
        #expect(text.hasSuffix("000Z") && text.count == "2027-01-15T08:00:00.123000Z".count, "\(text)")
        let parsed = try #require(ReplicaLeases.parseMicroTime(text))
        #expect(abs(parsed.timeIntervalSince(date)) < 0.001)
        #expect(ReplicaLeases.parseMicroTime("2026-11-30T16:40:05Z") != nil)
        #expect(ReplicaLeases.parseMicroTime("yesterday") == nil)
    }
}
