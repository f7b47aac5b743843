import NIOCore
import TunnelSupport

/// The agent's meta port: health, readiness (the tunnel and how many server replicas it holds) and metrics.
extension EdgeTunnelAgent {
    /// Serves `/healthz`, `/readyz` and `/metrics` on the meta port (loopback by default).
    public func startMeta() async throws {
        let channel = try await MetaHTTPServer.bind(
            host: configuration.metaBindAddress, port: configuration.metaPort, group: group
        ) { [weak self] _, path in
            self?.route(path) ?? .text(.serviceUnavailable, "stopping")
        }
        lock.withLock { metaChannel = channel }
    }

    public var metaPort: Int { lock.withLock { metaChannel?.localAddress?.port ?? 0 } }

    func route(_ path: String) -> MetaResponse {
        switch path {
        case "/healthz", "/livez":
            return .text(.ok, "ok")
        case "/readyz":
            if let address = connectedAddress {
                let count = replicas.count
                guard count > 1 else { return .text(.ok, "ok: tunnel up via \(address)") }
                return .text(
                    .ok, "ok: tunnel up via \(address) (\(1 + replicas.extras.count) of \(count) server replicas)")
            }
            return .text(.serviceUnavailable, "tunnel down")
        case "/metrics":
            let (tunnel, retired) = lock.withLock { (current, retiredBytes) }
            var counters = tunnel?.mux.counters.snapshot ?? (bytesIn: 0, bytesOut: 0, streams: 0)
            var paced = tunnel?.mux.counters.paced == true ? 1 : 0
            for extra in replicas.extras {
                let more = extra.mux.counters.snapshot
                counters = (
                    counters.bytesIn + more.bytesIn, counters.bytesOut + more.bytesOut, counters.streams + more.streams
                )
                paced += extra.mux.counters.paced ? 1 : 0
            }
            return MetaResponse(
                status: .ok, contentType: "text/plain; version=0.0.4; charset=utf-8",
                body: metrics.render(
                    bytesIn: retired.bytesIn + counters.bytesIn, bytesOut: retired.bytesOut + counters.bytesOut,
                    streamCount: counters.streams, pacedTunnels: paced))
        default:
            return .text(.notFound, "no such endpoint: \(path)")
        }
    }
}
