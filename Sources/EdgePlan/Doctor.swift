import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import TunnelPKI
import TunnelSupport
import X509
import Yams

/// One line of `edgetunnel doctor`.
public struct CheckResult: Codable, Sendable, Equatable {
    public enum Status: String, Codable, Sendable { case pass, warn, fail }
    public var check: String
    public var status: Status
    public var message: String
    /// What to do about a failure or warning.
    public var fix: String?

    public init(_ check: String, _ status: Status, _ message: String, fix: String? = nil) {
        self.check = check
        self.status = status
        self.message = message
        self.fix = fix
    }

    public var line: String {
        "\(status.rawValue.uppercased().padding(toLength: 5, withPad: " ", startingAt: 0)) \(check): \(message)"
            + (fix.map { " — fix: \($0)" } ?? "")
    }
}

/// The checks of `edgetunnel doctor`: a live setup against the plan.
public enum Doctor {
    // MARK: TLS

    /// Connects to `address`, and checks that its certificate chains to the CA in `caFile`, is valid now and
    /// covers `address` — the failure the source document's manual certificate deletion works around.
    public static func checkTLS(address: String, caFile: String, timeout: TimeAmount = .seconds(5)) async -> CheckResult
    {
        let name = "tls \(address)"
        let ca: Certificate
        do {
            ca = try PEMFiles.certificate(at: caFile)
        } catch {
            return CheckResult(name, .fail, "\(error)", fix: "give the tunnel CA with --ca-file")
        }
        guard let target = HostPort(authority: address) else {
            return CheckResult(
                name, .fail, "\"\(address)\" is not HOST:PORT", fix: "give --server-address as HOST:PORT")
        }
        let leaf: Certificate
        do {
            leaf = try await fetchLeaf(host: target.host, port: target.port, timeout: timeout)
        } catch {
            return CheckResult(
                name, .fail, "no TLS answer: \(error)",
                fix:
                    "check that the tunnel server listens there and that the path (security group, load balancer, private line) lets TCP \(target.port) through"
            )
        }
        guard ca.publicKey.isValidSignature(leaf.signature, for: leaf), leaf.issuer == ca.subject else {
            return CheckResult(
                name, .fail, "certificate \(leaf.subject) is not issued by the CA in \(caFile)",
                fix:
                    "point the agents at this server only if it serves a certificate of the tunnel CA; compare `edgetunnel pki ca-hash`"
            )
        }
        let now = Date()
        guard leaf.notValidAfter > now, leaf.notValidBefore < now.addingTimeInterval(300) else {
            return CheckResult(
                name, .fail,
                "certificate is outside its validity (\(Timestamps.iso8601(leaf.notValidBefore)) to \(Timestamps.iso8601(leaf.notValidAfter)))",
                fix: "the server renews its certificate itself; check its clock and that it is running")
        }
        let sans = (try? CertificateSummary(leaf)) ?? nil
        let covered: Bool
        if let ip = IPAddress(target.host) {
            covered = sans?.ipAddresses.contains(ip.description) ?? false
        } else {
            let host = target.host.lowercased()
            covered =
                sans?.dnsNames.contains { name in
                    name == host
                        || (name.hasPrefix("*.") && host.hasSuffix(name.dropFirst(1))
                            && !host.dropLast(name.count - 1).contains("."))
                } ?? false
        }
        guard covered else {
            let key = IPAddress(target.host) != nil ? "certIPs" : "certDNSNames"
            return CheckResult(
                name, .fail,
                "certificate does not cover \(target.host) (it names \(((sans?.ipAddresses ?? []) + (sans?.dnsNames ?? [])).joined(separator: ", ")))",
                fix:
                    "add \(target.host) to the server's \(key) in its config file: EdgeTunnel issues its certificate for the new address set itself, no files to delete"
            )
        }
        return CheckResult(
            name, .pass,
            "certificate chains to the CA, is valid until \(Timestamps.iso8601(leaf.notValidAfter)) and covers \(target.host)"
        )
    }

    static func fetchLeaf(host: String, port: Int, timeout: TimeAmount) async throws -> Certificate {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.certificateVerification = .none
        let context = try NIOSSLContext(configuration: configuration)
        let channel = try await TLSClient.connect(
            host: host, port: port, on: MultiThreadedEventLoopGroup.singleton.any(), context: context,
            serverHostname: TLSClient.serverName(for: host), within: timeout)
        defer { channel.close(promise: nil) }
        let der = try await channel.eventLoop.submit {
            try channel.pipeline.syncOperations.nioSSL_peerCertificate()?.toDERBytes()
        }.get()
        guard let der else { throw PlanError("server presented no certificate") }
        return try Certificate(derEncoded: der)
    }

    // MARK: Service

    /// Checks a Service as `kubectl get svc -o yaml` prints it against what `mode` needs.
    public static func checkService(yaml text: String, path: String, mode: Connectivity) -> [CheckResult] {
        let name = "service \(path)"
        guard let object = (try? SafeYAML.load(text)) as? [String: Any] else {
            return [
                CheckResult(
                    name, .fail, "not a YAML object",
                    fix: "save it with kubectl -n kube-system get svc x-tunnel-server-svc -o yaml")
            ]
        }
        guard (object["kind"] as? String) == "Service" else {
            return [
                CheckResult(
                    name, .fail, "kind is \(object["kind"] as? String ?? "missing"), not Service",
                    fix: "give the x-tunnel-server-svc Service")
            ]
        }
        var results: [CheckResult] = []
        let metadata = object["metadata"] as? [String: Any] ?? [:]
        let spec = object["spec"] as? [String: Any] ?? [:]
        let svcName = metadata["name"] as? String ?? "?"
        let namespace = metadata["namespace"] as? String ?? "?"
        if svcName != "x-tunnel-server-svc" || namespace != "kube-system" {
            results.append(
                CheckResult(name, .warn, "Service is \(namespace)/\(svcName), not kube-system/x-tunnel-server-svc"))
        }
        let wanted = mode == .internet ? "LoadBalancer" : "ClusterIP"
        let type = spec["type"] as? String ?? "ClusterIP"
        if type == wanted {
            results.append(CheckResult(name, .pass, "type \(type) is right for \(mode.rawValue)"))
        } else {
            results.append(
                CheckResult(
                    name, .fail, "type \(type), but \(mode.rawValue) needs \(wanted)",
                    fix: "kubectl -n kube-system patch svc x-tunnel-server-svc -p '{\"spec\":{\"type\":\"\(wanted)\"}}'"
                        + (mode == .expressConnect ? ", then add its ClusterIP to the server's certIPs" : "")))
        }
        let ports = (spec["ports"] as? [[String: Any]]) ?? []
        for (portName, number) in [("https", 10263), ("tcp", 10262)] {
            let match = ports.first { ($0["name"] as? String) == portName }
            if let match, (match["port"] as? Int) == number {
                results.append(CheckResult(name, .pass, "port \(portName) is \(number)"))
            } else {
                results.append(
                    CheckResult(
                        name, .fail, "port \(portName) \(number)/TCP is missing or different",
                        fix: "render the Service with `edgetunnel manifests` and apply it"))
            }
        }
        let selector = spec["selector"] as? [String: Any] ?? [:]
        if (selector["k8s-app"] as? String) != "edge-tunnel-server" {
            results.append(
                CheckResult(
                    name, .fail, "selector does not pick k8s-app: edge-tunnel-server",
                    fix: "set spec.selector to k8s-app: edge-tunnel-server"))
        }
        return results
    }

    // MARK: Security group

    public static func checkSecurityGroup(
        _ group: SecurityGroupExport, path: String, edgeCIDRs: [CIDR]
    ) -> [CheckResult] {
        let name = "security group \(group.SecurityGroupId ?? path)"
        guard !edgeCIDRs.isEmpty else {
            return [
                CheckResult(
                    name, .fail, "no --edge-cidr to check UDP 8472 for", fix: "give every edge CIDR with --edge-cidr")
            ]
        }
        return edgeCIDRs.map { cidr in
            let verdict = SecurityGroupVerdict.evaluate(group, protocol: "udp", port: 8472, from: cidr)
            if verdict.allowed { return CheckResult(name, .pass, verdict.explanation) }
            return CheckResult(
                name, .fail, verdict.explanation,
                fix:
                    "aliyun ecs AuthorizeSecurityGroup --RegionId <region-id> --SecurityGroupId \(group.SecurityGroupId ?? "<security-group-id>") --IpProtocol udp --PortRange 8472/8472 --SourceCidrIp \(cidr) --Policy accept --Priority 1 (and remove or lower any Drop rule above it)"
            )
        }
    }

    // MARK: Pools live

    /// Checks that the agents of edge pool `pool` among `agents` (a server's `/v1/agents`, read from `server`) are
    /// connected over the `expected` path: an express-connect pool's over the private line, an internet pool's
    /// over the internet. Names the agents that are not (up to 50 of them); a pool with no agent fails too.
    public static func checkPool(
        _ pool: String, expected: TunnelPath, agents: [AgentInfo], server: String
    ) -> CheckResult {
        let name = "pool \(pool)"
        let members = agents.filter { $0.pool == pool }.sorted { $0.nodeName < $1.nodeName }
        guard !members.isEmpty else {
            return CheckResult(
                name, .fail, "no agent of pool \(pool) is connected to \(server)",
                fix:
                    "check the pool's agent DaemonSet (node selector, pod logs) and that its agents declare the pool (--pool or "
                    + "EDGE_TUNNEL_POOL), or with --node-objects that their Nodes carry the pool label (--pool-label)")
        }
        let wrong = members.filter { $0.path != expected.rawValue }
        guard !wrong.isEmpty else {
            return CheckResult(
                name, .pass,
                "all \(members.count) agent(s) are connected over the \(expected.rawValue) path ("
                    + Self.names(members.map(\.nodeName)) + ")")
        }
        let listed = Self.names(wrong.map { "\($0.nodeName) (\($0.path ?? TunnelPath.unknown))" })
        var fixes: [String] = []
        let paths = Set(wrong.map { $0.path ?? TunnelPath.unknown })
        if paths.contains(TunnelPath.internet.rawValue) {
            fixes.append(
                "an agent on the internet path could not use the line: check the line and that the pool's "
                    + "addresses file (ConfigMap) lists the line address first — the agent returns to it once it answers"
            )
        }
        if paths.contains(TunnelPath.private.rawValue) {
            fixes.append(
                "an internet pool's addresses file should list only the public address (or mark it internet=HOST:PORT)")
        }
        if !paths.isSubset(of: [TunnelPath.internet.rawValue, TunnelPath.private.rawValue]) {
            fixes.append("an agent with path unknown predates path reporting: upgrade it")
        }
        return CheckResult(
            name, .fail,
            "\(wrong.count) of \(members.count) agent(s) are not connected over the \(expected.rawValue) path: \(listed)",
            fix: fixes.joined(separator: "; "))
    }

    /// Up to 50 names, then how many more.
    private static func names(_ all: [String]) -> String {
        let shown = all.prefix(50).joined(separator: ", ")
        return all.count > 50 ? shown + " and \(all.count - 50) more" : shown
    }

    // MARK: UDP

    public static func checkUDP(target: String, count: Int = 5, timeout: Double = 2) -> CheckResult {
        let name = "udp \(target)"
        do {
            let result = try UDPProbe.probe(target: target, count: count, timeout: timeout)
            if result.passes {
                return CheckResult(
                    name, .pass,
                    "\(result.received)/\(result.sent) probes came back, rtt avg \(String(format: "%.2f", result.rttMillisecondsAvg ?? 0)) ms"
                )
            }
            return CheckResult(
                name, .fail, "0/\(result.sent) probes came back",
                fix:
                    "run `edgetunnel probe udp --listen` on the other host, and open UDP \(target.split(separator: ":").last ?? "8472") in the security group and any firewall between"
            )
        } catch {
            return CheckResult(name, .fail, "\(error)")
        }
    }
}
