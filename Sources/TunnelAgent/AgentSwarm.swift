import Logging
import NIOCore
import TunnelPKI

/// Many agents in one process, each with its own node certificate issued in memory, sharing one event loop
/// group: what `edgetunnel bench swarm` runs to measure the server's footprint per agent and how fast a fleet
/// comes back after a server or a replica restarts. Node names are `prefix0`, `prefix1`, …; the agents allow no
/// destination (nothing flows through a swarm).
public final class AgentSwarm: Sendable {
    public let agents: [EdgeTunnelAgent]

    public init(
        server: String, ca: CertificateAuthority, agents count: Int, prefix: String, group: EventLoopGroup,
        logger: Logger
    ) throws {
        agents = try (0..<count).map { index in
            let name = "\(prefix)\(index)"
            let issued = try ca.issueNodeCertificate(nodeName: name)
            let configuration = AgentConfiguration(
                nodeName: name, serverAddresses: [server], allowList: AllowList(rules: []))
            let agent = try EdgeTunnelAgent(configuration: configuration, logger: logger, group: group)
            agent.useCredentials(
                AgentCredentials(certificate: issued.certificate, privateKey: issued.privateKey, ca: ca.certificate))
            return agent
        }
    }

    /// Starts every agent; each runs until the process ends.
    public func start() {
        for agent in agents { Task { await agent.run() } }
    }

    /// Agents holding a tunnel now.
    public var connectedCount: Int {
        agents.reduce(0) { $0 + ($1.connectedAddress == nil ? 0 : 1) }
    }
}
