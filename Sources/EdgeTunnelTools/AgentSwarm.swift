import Logging
import NIOCore
import TunnelAgent
import TunnelPKI
import TunnelSupport

/// Many agents in one process, each with its own node certificate issued in memory, sharing one event loop
/// group: what `edgetunnel bench swarm` runs to measure the server's footprint per agent and how fast a fleet
/// comes back after a server or a replica restarts. Node names are `prefix0`, `prefix1`, …; the agents allow no
/// destination (nothing flows through a swarm).
public final class AgentSwarm: Sendable {
    public let agents: [EdgeTunnelAgent]

    /// `sourceNetwork`: when set (an IPv4 /16 on loopback, `127.N.0.0`), agent i leaves from its own address
    /// in it, as every edge node has its own: the server's per-source limits then meet the fleet as in
    /// production, not one address for all.
    public init(
        server: String, ca: CertificateAuthority, agents count: Int, prefix: String, group: EventLoopGroup,
        logger: Logger, sourceNetwork: IPAddress? = nil
    ) throws {
        if let sourceNetwork {
            let bytes = sourceNetwork.bytes
            guard sourceNetwork.isIPv4, bytes[2] == 0, bytes[3] == 0, count <= 250 * 256 else {
                throw ConfigurationError(
                    "invalid source network \(sourceNetwork): an IPv4 A.B.0.0 with at most 64,000 agents")
            }
        }
        agents = try (0..<count).map { index in
            let name = "\(prefix)\(index)"
            let issued = try ca.issueNodeCertificate(nodeName: name)
            var configuration = AgentConfiguration(
                nodeName: name, serverAddresses: [server], allowList: AllowList(rules: []))
            if let network = sourceNetwork?.bytes {
                configuration.sourceAddress = IPAddress(bytes: [
                    network[0], network[1], UInt8(index / 250), UInt8(index % 250 + 1),
                ])
            }
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
