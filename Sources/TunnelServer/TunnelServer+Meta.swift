import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import TunnelPKI
import TunnelSupport

/// The meta port: health, readiness, metrics and the agent list.
extension TunnelServer {
    /// With several replicas a caller routed here must find its node here: until every joined node holds a
    /// tunnel to this replica (or ``ServerConfiguration/replicaWarmup`` has passed) it is not ready, so the
    /// callers' Service does not send it requests it would answer with 502. The agents' Service must include
    /// unready replicas (`publishNotReadyAddresses`), or they could never attach.
    private func replicaWarmingUp() -> String? {
        guard core.serverCount > 1, NIODeadline.now() - started < configuration.replicaWarmup else { return nil }
        let expected = core.identities.expectedNodes
        guard !expected.isEmpty else { return nil }
        let missing = expected.subtracting(core.registry.sessions.map(\.nodeName))
        guard let example = missing.min() else { return nil }
        return "warming up: \(expected.count - missing.count) of \(expected.count) joined nodes hold a tunnel to this "
            + "replica (missing: \(example)\(missing.count > 1 ? " and \(missing.count - 1) more" : ""))"
    }

    func route(_ method: HTTPMethod, _ path: String) -> MetaResponse {
        switch path {
        case "/healthz", "/livez":
            return .text(.ok, "ok")
        case "/readyz", "/readyz/listeners":
            let isReady = lock.withLock { ready }
            guard isReady else { return .text(.serviceUnavailable, "listeners are not up") }
            // A replica that cannot list the join state (RBAC, the API down) accepts no agent: a rollout with
            // broken access stops at its first pod.
            guard core.identities.isLoaded else {
                return .text(.serviceUnavailable, "the join state (tokens, node records) has not been listed yet")
            }
            if let service = unlistedAddressService {
                return .text(
                    .serviceUnavailable,
                    addressServiceRefusal(service) ?? "the addresses of Service \(service) have not been listed yet")
            }
            // `/readyz/listeners` is for a Service that agents use too: agents must reach an unready replica.
            if path == "/readyz", let missing = replicaWarmingUp() { return .text(.serviceUnavailable, missing) }
            return .text(.ok, "ok")
        case "/metrics":
            return MetaResponse(
                status: .ok, contentType: "text/plain; version=0.0.4; charset=utf-8",
                body: core.metrics.render(
                    registry: core.registry, gates: lock.withLock { gates }, budget: core.limits.processBudget,
                    retained: core.limits.processRetained, pool: { [core] in core.pool(of: $0) }))
        case "/v1/agents":
            return MetaResponse(status: .ok, contentType: "application/json", body: agentsJSON())
        case "/v1/server":
            return MetaResponse(status: .ok, contentType: "application/json", body: serverJSON())
        default:
            return .text(.notFound, "no such endpoint: \(path)")
        }
    }

    public var agents: [AgentInfo] {
        core.registry.sessions.map { session in
            let counters = session.mux.counters.snapshot
            // The IPs that lead to the node now: with Node objects, those its Node still reports.
            return AgentInfo(
                nodeName: session.nodeName, nodeIPs: core.registry.routedIPs(of: session.nodeName),
                connectedSince: session.connectedSince,
                remoteAddress: session.remoteAddress, streams: counters.streams, bytesFromAgent: counters.bytesIn,
                bytesToAgent: counters.bytesOut, paced: session.mux.counters.paced, pool: core.pool(of: session),
                path: session.path?.rawValue ?? TunnelPath.unknown)
        }.sorted { $0.nodeName < $1.nodeName }
    }

    public var serverInfo: ServerInfo {
        let certificate = core.servingCertificate
        let summary = try? CertificateSummary(certificate)
        return ServerInfo(
            serverID: configuration.serverID, certificateIPs: summary?.ipAddresses ?? [],
            certificateDNSNames: summary?.dnsNames ?? [], certificateSerial: summary?.serialNumber ?? "",
            certificateNotAfter: certificate.notValidAfter, agents: core.registry.count)
    }

    private func serverJSON() -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.sortedKeys]
        return Array((try? encoder.encode(serverInfo)) ?? Data())
    }

    private func agentsJSON() -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.sortedKeys]
        struct Body: Encodable {
            var serverID: String
            var agents: [AgentInfo]
        }
        return Array((try? encoder.encode(Body(serverID: configuration.serverID, agents: agents))) ?? Data())
    }
}
