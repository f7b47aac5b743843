import ArgumentParser
import Foundation
import TunnelPKI
import TunnelSupport

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// `edgetunnel status`: the agents connected to a server, as a table.
struct StatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Show the agents connected to a tunnel server (its /v1/agents).")

    @Option(help: "The server's meta address.") var server = "http://127.0.0.1:10265"
    @Option(help: "text or json.") var output: OutputFormat = .text

    func run() async throws {
        try await reportingErrors {
            if output == .json {
                let body = try await AgentList.fetch(server: server)
                let encoder = JSONEncoder()
                encoder.dateEncodingStrategy = .iso8601
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try encoder.encode(body.agents), as: UTF8.self))
                return
            }
            let body = try await AgentList.fetch(server: server)
            let now = Date()
            var table = [["NODE", "POOL", "PATH", "IPS", "CONNECTED", "REMOTE", "STREAMS", "BYTES IN", "BYTES OUT"]]
            for agent in body.agents {
                table.append([
                    agent.nodeName, agent.pool ?? "-", agent.path ?? TunnelPath.unknown,
                    agent.nodeIPs.joined(separator: ","),
                    Durations.format(now.timeIntervalSince(agent.connectedSince)), agent.remoteAddress,
                    "\(agent.streams)", "\(agent.bytesFromAgent)", "\(agent.bytesToAgent)",
                ])
            }
            print("server \(body.serverID): \(body.agents.count) agent(s)")
            print(TextTable.render(table))
        }
    }
}
