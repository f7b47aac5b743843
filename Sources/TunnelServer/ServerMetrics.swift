import Prometheus
import TunnelSupport
import TunnelWire

/// The server's Prometheus metrics (swift-prometheus), one registry per server instance.
final class ServerMetrics: @unchecked Sendable {
    let registry = PrometheusCollectorRegistry()
    let agents: Gauge
    /// `edge_tunnel_server_pool_agents{pool, path}`: the agents by edge pool and path, label values bounded.
    let poolAgents: PoolAgentGauges
    let streams: Gauge
    let pacedTunnels: Gauge
    let dialDuration: DurationHistogram
    let bytesFromAgents: TotalCounter
    let bytesToAgents: TotalCounter
    let certificateExpiry: Gauge
    private let failures: LabeledCounters
    /// Connections closed before they authenticated, by listener and reason (``ConnectionGate/Rejection``).
    let connectionsRejected: LabeledCounters
    let pendingConnections: LabeledGauges
    let admissionLimits: LabeledGauges
    /// Streams refused by a limit (`streams_per_agent`, `pending_opens`, `streams_per_caller`, `buffer_budget`).
    let limitHits: LabeledCounters
    let bufferedBytes: Gauge
    /// HELLOs refused because the agent already holds a tunnel to this replica (it dials the Service again).
    let duplicateTunnels: Counter
    /// Connections admitted past authentication, by listener: on the tunnel port, agents' tunnels registered (one
    /// TLS handshake each; a HELLO refused as a duplicate counts in `duplicateTunnels`, a join not at all), on plain
    /// ports a request head. With `agents` and `replicaProbes`: what a fill costs per agent.
    let connectionsAuthenticated: LabeledCounters
    /// Replica probes answered (``ReplicaProbe``): a line before TLS, so that an agent dialing the Service learns
    /// which replica it reached before it pays for a handshake.
    let replicaProbes: Counter
    /// Server replicas the agents are told about.
    let replicas: Gauge
    /// Resumable tunnels whose connection is lost and whose streams wait for the agent (PROTOCOL.md, "Resuming").
    let suspendedTunnels: Gauge
    /// What became of suspended tunnels: `resumed` on the agent's new connection, or `ended` (grace period over,
    /// the agent restarted, revoked, shutdown).
    let resumes: LabeledCounters
    /// Streams that stopped keeping what they send (the tunnel's or the process's retention bound reached): they
    /// cannot be resumed.
    let unresumableStreams: Counter
    let retainedBytes: Gauge
    /// The gRPC frontend (`frontend="grpc"`): its open Proxy RPCs and connectIDs, and how its dials ended.
    let frontendRPCs: LabeledGauges
    let frontendConnections: LabeledGauges
    let frontendDials: LabeledCounters

    init() {
        suspendedTunnels = registry.makeGauge(
            descriptor: .named(
                "edge_tunnel_server_suspended_tunnels",
                help: "Tunnels whose connection was lost and whose streams wait for their agent to resume them."))
        resumes = LabeledCounters(
            registry: registry, name: "edge_tunnel_server_tunnel_resumes_total", label: "outcome",
            help: "Suspended tunnels by what became of them: resumed on the agent's new connection, or ended.")
        retainedBytes = registry.makeGauge(
            descriptor: .named(
                "edge_tunnel_server_retained_bytes",
                help:
                    "Bytes sent and kept to send again after a resume, over all tunnels (bounded by --max-buffered-mib)."
            ))
        unresumableStreams = registry.makeCounter(
            descriptor: .named(
                "edge_tunnel_server_unresumable_streams_total",
                help:
                    "Streams that stopped keeping their sent bytes (the tunnel's or the process's retention bound): reset, not resumed, if the connection is lost."
            ))
        duplicateTunnels = registry.makeCounter(
            descriptor: .named(
                "edge_tunnel_server_duplicate_tunnels_total",
                help: "Registrations refused because the agent already has a tunnel to this replica."))
        connectionsAuthenticated = LabeledCounters(
            registry: registry, name: "edge_tunnel_server_connections_authenticated_total", label: "port",
            help:
                "Connections that authenticated (a TLS handshake with a client certificate, or a request head), by listener."
        )
        replicaProbes = registry.makeCounter(
            descriptor: .named(
                "edge_tunnel_server_replica_probes_total",
                help: "Replica probes answered on the tunnel port (a line before TLS naming this replica)."))
        replicas = registry.makeGauge(
            descriptor: .named("edge_tunnel_server_replicas", help: "Server replicas every agent keeps a tunnel to."))
        agents = registry.makeGauge(
            descriptor: .named("edge_tunnel_server_agents", help: "Agents connected to this server."))
        poolAgents = PoolAgentGauges(registry: registry)
        streams = registry.makeGauge(
            descriptor: .named("edge_tunnel_server_streams", help: "Streams open through this server."))
        pacedTunnels = registry.makeGauge(
            descriptor: .named(
                "edge_tunnel_server_paced_tunnels",
                help:
                    "Tunnels paced now: their link to the agent is slow (below 100 Mbit/s), so replies go ahead of bulk."
            ))
        dialDuration = registry.makeDurationHistogram(
            descriptor: .named(
                "edge_tunnel_server_dial_duration_seconds", help: "Time from a caller's request to the agent's answer."),
            buckets: [
                .milliseconds(1), .milliseconds(5), .milliseconds(10), .milliseconds(50), .milliseconds(100),
                .milliseconds(500), .seconds(1), .seconds(5), .seconds(15),
            ])
        let bytes = MetricNameDescriptor.named(
            "edge_tunnel_server_bytes_total", help: "Stream bytes carried through the tunnel.")
        bytesFromAgents = TotalCounter(registry.makeCounter(descriptor: bytes, labels: [("direction", "from_agent")]))
        bytesToAgents = TotalCounter(registry.makeCounter(descriptor: bytes, labels: [("direction", "to_agent")]))
        certificateExpiry = registry.makeGauge(
            descriptor: .named(
                "edge_tunnel_server_certificate_expiry_timestamp_seconds",
                help: "When the serving certificate expires (Unix time)."))
        failures = LabeledCounters(
            registry: registry, name: "edge_tunnel_server_dial_failures_total", label: "reason",
            help: "Streams that could not be opened, by reason.")
        connectionsRejected = LabeledCounters(
            registry: registry, name: "edge_tunnel_server_connections_rejected_total", labels: ["port", "reason"],
            help: "Connections closed before they authenticated: listener full, source full, or handshake too slow.")
        limitHits = LabeledCounters(
            registry: registry, name: "edge_tunnel_server_limit_hits_total", label: "limit",
            help: "Streams, renewals or connections refused because a limit was reached, by limit.")
        bufferedBytes = registry.makeGauge(
            descriptor: .named(
                "edge_tunnel_server_window_budget_bytes",
                help: "Receive window granted over all tunnels (--max-buffered-mib bounds it)."))
        frontendRPCs = LabeledGauges(
            registry: registry, name: "edge_tunnel_server_frontend_rpcs", label: "frontend",
            help: "Proxy RPCs open on the gRPC frontend (--grpc-uds-path).")
        frontendConnections = LabeledGauges(
            registry: registry, name: "edge_tunnel_server_frontend_connections", label: "frontend",
            help: "Connections (connectIDs) open through the gRPC frontend, each a tunnel stream.")
        frontendDials = LabeledCounters(
            registry: registry, name: "edge_tunnel_server_frontend_dials_total", labels: ["frontend", "result"],
            help:
                "Dials through the gRPC frontend by result: opened, failed (a DIAL_RSP error), cancelled (DIAL_CLS or the client left)."
        )
        pendingConnections = LabeledGauges(
            registry: registry, name: "edge_tunnel_server_unauthenticated_connections", label: "port",
            help: "Connections still in their TLS handshake or before their request head, by listener.")
        admissionLimits = LabeledGauges(
            registry: registry, name: "edge_tunnel_server_unauthenticated_connection_limit", label: "port",
            help:
                "How many unauthenticated connections a listener admits now (lower than --max-pending-connections under a handshake overload)."
        )
    }

    func dialFailed(reason: String) {
        failures.increment(reason)
    }

    /// Refreshes the values that are read from live state, then renders the Prometheus text format. `pool` gives
    /// an agent's edge pool (``TunnelServerCore/pool(of:)``).
    func render(
        registry agentRegistry: AgentRegistry, gates: [ConnectionGate], budget: WindowBudget?,
        retained: RetainedBudget?,
        pool: (AgentSession) -> String? = { $0.declaredPool }
    ) -> [UInt8] {
        bufferedBytes.set(Double(budget?.inUse ?? 0))
        retainedBytes.set(Double(retained?.inUse ?? 0))
        for gate in gates {
            pendingConnections.set(gate.port, Double(gate.pendingCount))
            admissionLimits.set(gate.port, Double(gate.admissionLimit))
        }
        let sessions = agentRegistry.sessions
        agents.set(Double(sessions.count))
        poolAgents.update(sessions.map { (pool($0), $0.path?.rawValue ?? TunnelPath.unknown) })
        suspendedTunnels.set(Double(agentRegistry.suspendedCount))
        streams.set(Double(sessions.reduce(0) { $0 + $1.streamCount }))
        pacedTunnels.set(Double(sessions.reduce(0) { $0 + ($1.mux.counters.paced ? 1 : 0) }))
        let totals = agentRegistry.totalBytes
        bytesFromAgents.update(to: totals.fromAgents)
        bytesToAgents.update(to: totals.toAgents)
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        return buffer
    }
}
