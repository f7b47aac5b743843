import NIOConcurrencyHelpers
import Prometheus
import TunnelSupport

/// The agent's Prometheus metrics.
final class AgentMetrics: @unchecked Sendable {
    let registry = PrometheusCollectorRegistry()
    let connected: Gauge
    /// Tunnels registered, one per server replica reached.
    let serverTunnels: Gauge
    let streams: Gauge
    let pacedTunnels: Gauge
    let refused: Counter
    /// Tunnels whose connection was lost and whose streams wait to be resumed, one per server replica at most.
    let suspendedTunnels: Gauge
    /// What became of them: `resumed` on a new connection, or `ended` (grace period over, not resumable).
    let resumes: LabeledCounters
    let reconnects: Counter
    let bytesFromServer: TotalCounter
    let bytesToServer: TotalCounter
    let certificateExpiry: Gauge
    private let failures: LabeledCounters
    private let lock = NIOLock()
    private var active: [String: Gauge] = [:]

    init(serverAddresses: [String]) {
        connected = registry.makeGauge(
            descriptor: .named("edge_tunnel_agent_connected", help: "1 while the tunnel is registered."))
        serverTunnels = registry.makeGauge(
            descriptor: .named(
                "edge_tunnel_agent_server_tunnels", help: "Registered tunnels, one per server replica reached."))
        streams = registry.makeGauge(
            descriptor: .named("edge_tunnel_agent_streams", help: "Streams open through this agent."))
        pacedTunnels = registry.makeGauge(
            descriptor: .named(
                "edge_tunnel_agent_paced_tunnels",
                help:
                    "Tunnels paced now: their link to the server is slow (below 100 Mbit/s), so replies go ahead of bulk."
            ))
        suspendedTunnels = registry.makeGauge(
            descriptor: .named(
                "edge_tunnel_agent_suspended_tunnels",
                help: "Tunnels whose connection was lost and whose streams wait to be resumed on a new one."))
        resumes = LabeledCounters(
            registry: registry, name: "edge_tunnel_agent_tunnel_resumes_total", label: "outcome",
            help: "Suspended tunnels by what became of them: resumed on a new connection, or ended.")
        refused = registry.makeCounter(
            descriptor: .named("edge_tunnel_agent_refused_total", help: "Stream requests refused by the allow list."))
        reconnects = registry.makeCounter(
            descriptor: .named(
                "edge_tunnel_agent_reconnects_total", help: "Tunnel connections attempted after the first."))
        let bytes = MetricNameDescriptor.named(
            "edge_tunnel_agent_bytes_total", help: "Stream bytes carried through the tunnel.")
        bytesFromServer = TotalCounter(registry.makeCounter(descriptor: bytes, labels: [("direction", "from_server")]))
        bytesToServer = TotalCounter(registry.makeCounter(descriptor: bytes, labels: [("direction", "to_server")]))
        failures = LabeledCounters(
            registry: registry, name: "edge_tunnel_agent_dial_failures_total", label: "reason",
            help: "Targets the agent could not dial, by reason.")
        certificateExpiry = registry.makeGauge(
            descriptor: .named(
                "edge_tunnel_agent_certificate_expiry_timestamp_seconds",
                help: "When the node certificate expires (Unix time)."))
        setAddresses(serverAddresses)
    }

    func setAddresses(_ addresses: [String]) {
        lock.withLock {
            for address in addresses where active[address] == nil {
                active[address] = registry.makeGauge(
                    descriptor: .named(
                        "edge_tunnel_agent_active_server",
                        help: "1 for the server address the tunnel uses now, 0 for the others."),
                    labels: [("address", address)])
            }
        }
    }

    func setActive(_ address: String?) {
        lock.withLock {
            for (key, gauge) in active { gauge.set(Int64(key == address ? 1 : 0)) }
        }
    }

    func dialFailed(reason: String) {
        failures.increment(reason)
    }

    /// Adds the byte totals seen since the last scrape and renders the Prometheus text format.
    func render(bytesIn: Int, bytesOut: Int, streamCount: Int, pacedTunnels paced: Int) -> [UInt8] {
        streams.set(Double(streamCount))
        pacedTunnels.set(Double(paced))
        bytesFromServer.update(to: bytesIn)
        bytesToServer.update(to: bytesOut)
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        return buffer
    }
}
