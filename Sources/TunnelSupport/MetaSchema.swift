import Foundation

// The JSON the server's meta port serves under `/v1`, shared by the server that writes it and the CLI
// (`edgetunnel routes`, `status`) that reads it. Dates are ISO 8601; keys are sorted.

/// What `/v1/agents` serves.
public struct AgentInfo: Codable, Sendable {
    public var nodeName: String
    public var nodeIPs: [String]
    public var connectedSince: Date
    public var remoteAddress: String
    public var streams: Int
    public var bytesFromAgent: Int
    public var bytesToAgent: Int
    /// The tunnel towards the agent is paced now: its link is slow, and the server keeps its queue short. (Absent
    /// from servers before it.)
    public var paced: Bool?
    /// The node's edge pool: its Node's pool label with `--node-objects`, else what the agent declared at HELLO.
    /// Absent: none (and from servers before it).
    public var pool: String?
    /// How the tunnel reaches the server: `private`, `internet` or `unknown` (an agent that did not say). Absent
    /// from servers before it.
    public var path: String?

    public init(
        nodeName: String, nodeIPs: [String], connectedSince: Date, remoteAddress: String, streams: Int,
        bytesFromAgent: Int, bytesToAgent: Int, paced: Bool? = nil, pool: String? = nil, path: String? = nil
    ) {
        self.nodeName = nodeName
        self.nodeIPs = nodeIPs
        self.connectedSince = connectedSince
        self.remoteAddress = remoteAddress
        self.streams = streams
        self.bytesFromAgent = bytesFromAgent
        self.bytesToAgent = bytesToAgent
        self.paced = paced
        self.pool = pool
        self.path = path
    }
}

/// What `/v1/server` serves: the certificate in force and the addresses it names.
public struct ServerInfo: Codable, Sendable {
    public var serverID: String
    public var certificateIPs: [String]
    public var certificateDNSNames: [String]
    public var certificateSerial: String
    public var certificateNotAfter: Date
    public var agents: Int

    public init(
        serverID: String, certificateIPs: [String], certificateDNSNames: [String], certificateSerial: String,
        certificateNotAfter: Date, agents: Int
    ) {
        self.serverID = serverID
        self.certificateIPs = certificateIPs
        self.certificateDNSNames = certificateDNSNames
        self.certificateSerial = certificateSerial
        self.certificateNotAfter = certificateNotAfter
        self.agents = agents
    }
}
