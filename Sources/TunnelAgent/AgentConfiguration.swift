import NIOCore
import TunnelPKI
import TunnelSupport
import TunnelWire

/// Everything an agent needs to start.
public struct AgentConfiguration: Sendable {
    public var nodeName: String
    public var nodeIPs: [IPAddress] = []
    /// Ordered: the first that works is used.
    public var serverAddresses: [String] = []
    /// The path of each marked server address (`private=HOST:PORT`, see ``AddressPaths``).
    public var addressPaths: [String: TunnelPath] = [:]
    /// The edge pool the agent declares at HELLO (`--pool`, `EDGE_TUNNEL_POOL`); a DNS label. Nil: none.
    public var pool: String?
    public var pkiDirectory = PKIPaths.defaultAgentDirectory
    public var bootstrapToken: String?
    public var caCertHash: String?
    public var allowList: AllowList
    public var metaBindAddress = "127.0.0.1"
    public var metaPort = 10266
    public var dialTimeout: TimeAmount = .seconds(10)
    /// TCP connect and TLS handshake to a server address; short so that a dead path is skipped quickly.
    public var connectTimeout: TimeAmount = .seconds(3)
    /// How often a more preferred server address is checked while the tunnel uses a less preferred one.
    public var failBackInterval: TimeAmount = .seconds(10)
    /// PING this often (the server's PONG keeps the tunnel counted alive).
    public var keepaliveInterval: TimeAmount = .seconds(3)
    /// No frame from the server for this long: the tunnel is dead. Checked every second, so a cut path is
    /// noticed within 10 s and the agent is on its next address well within 15 s.
    public var keepaliveTimeout: TimeAmount = .seconds(9)
    /// While data moves on a resumable tunnel: PING every 500 ms, dead after 1.5 s without a frame or a TCP ACK (``Keepalive/Active``), so
    /// that streams over a lost private line continue on the internet path within 2 s. Nil: the idle rule only.
    public var activeKeepalive: Keepalive.Active? = .standard
    public var backoffInitial: TimeAmount = .milliseconds(500)
    public var backoffCap: TimeAmount = .seconds(30)
    /// How long open streams may take to finish on shutdown.
    public var drainTimeout: TimeAmount = .seconds(10)
    /// Receive windows over all of the agent's tunnels: what a server can make the agent hold for targets that
    /// read slowly. A third of it may go to full 1 MiB windows on one tunnel; the rest serves streams beyond
    /// those with windows from 4 KiB up, so that ten thousand idle streams fit. The manifests give the agent
    /// 160 MiB of memory: this, ~25 MiB idle, and TLS buffers.
    public var bufferBudget = 96 << 20
    /// The local address tunnel connections leave from; nil lets the kernel choose. Only the benchmark swarm sets
    /// it (each of its agents from its own loopback address, as each edge node has its own), not a flag.
    public var sourceAddress: IPAddress?

    public init(
        nodeName: String, nodeIPs: [IPAddress] = [], serverAddresses: [String] = [], allowList: AllowList? = nil
    ) {
        self.nodeName = nodeName
        self.nodeIPs = nodeIPs
        self.serverAddresses = serverAddresses
        self.allowList = allowList ?? .kubeletDefault(nodeIPs: nodeIPs)
    }

    public var paths: PKIPaths { PKIPaths(directory: pkiDirectory) }
}

/// A `host:port` server address, IPv6 in brackets.
struct ServerAddress: Sendable, CustomStringConvertible {
    let host: String
    let port: Int
    let text: String

    init(parsing text: String) throws {
        func invalid() -> ConfigurationError {
            ConfigurationError("invalid server address \"\(text)\": expected HOST:PORT")
        }
        guard let (hostPart, portPart) = HostPort.split(text) else { throw invalid() }
        guard !hostPart.isEmpty, let port = Int(portPart), (1...65535).contains(port) else { throw invalid() }
        guard IPAddress(String(hostPart)) != nil || DNSName.isValid(hostPart.lowercased()) else { throw invalid() }
        self.host = String(hostPart)
        self.port = port
        self.text = text
    }

    var isIP: Bool { IPAddress(host) != nil }
    var description: String { text }
}
