import NIOConcurrencyHelpers
import Prometheus

/// The agent's Prometheus metrics.
final class AgentMetrics: @unchecked Sendable {
    let registry = PrometheusCollectorRegistry()
    let connected: Gauge
    let streams: Gauge
    let refused: Counter
    let reconnects: Counter
    let bytesFromServer: Counter
    let bytesToServer: Counter
    let certificateExpiry: Gauge
    private let lock = NIOLock()
    private var failures: [String: Counter] = [:]
    private var active: [String: Gauge] = [:]
    private var reportedIn = 0
    private var reportedOut = 0

    init(serverAddresses: [String]) {
        connected = registry.makeGauge(name: "edge_tunnel_agent_connected", help: "1 while the tunnel is registered.")
        streams = registry.makeGauge(name: "edge_tunnel_agent_streams", help: "Streams open through this agent.")
        refused = registry.makeCounter(
            name: "edge_tunnel_agent_refused_total", help: "Stream requests refused by the allow list.")
        reconnects = registry.makeCounter(
            name: "edge_tunnel_agent_reconnects_total", help: "Tunnel connections attempted after the first.")
        bytesFromServer = registry.makeCounter(
            name: "edge_tunnel_agent_bytes_total", labels: [("direction", "from_server")],
            help: "Stream bytes carried through the tunnel.")
        bytesToServer = registry.makeCounter(
            name: "edge_tunnel_agent_bytes_total", labels: [("direction", "to_server")],
            help: "Stream bytes carried through the tunnel.")
        certificateExpiry = registry.makeGauge(
            name: "edge_tunnel_agent_certificate_expiry_timestamp_seconds",
            help: "When the node certificate expires (Unix time).")
        setAddresses(serverAddresses)
    }

    func setAddresses(_ addresses: [String]) {
        lock.withLock {
            for address in addresses where active[address] == nil {
                active[address] = registry.makeGauge(
                    name: "edge_tunnel_agent_active_server", labels: [("address", address)],
                    help: "1 for the server address the tunnel uses now, 0 for the others.")
            }
        }
    }

    func setActive(_ address: String?) {
        lock.withLock {
            for (key, gauge) in active { gauge.set(Int64(key == address ? 1 : 0)) }
        }
    }

    func dialFailed(reason: String) {
        let counter = lock.withLock {
            if let counter = failures[reason] { return counter }
            let counter = registry.makeCounter(
                name: "edge_tunnel_agent_dial_failures_total", labels: [("reason", reason)],
                help: "Targets the agent could not dial, by reason.")
            failures[reason] = counter
            return counter
        }
        counter.increment()
    }

    /// Adds the byte totals seen since the last scrape and renders the Prometheus text format.
    func render(bytesIn: Int, bytesOut: Int, streamCount: Int) -> [UInt8] {
        streams.set(Double(streamCount))
        lock.withLock {
            if bytesIn > reportedIn {
                bytesFromServer.increment(by: Int64(bytesIn - reportedIn))
                reportedIn = bytesIn
            }
            if bytesOut > reportedOut {
                bytesToServer.increment(by: Int64(bytesOut - reportedOut))
                reportedOut = bytesOut
            }
        }
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        return buffer
    }
}
