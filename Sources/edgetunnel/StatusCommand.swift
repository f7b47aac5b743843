import ArgumentParser
import Foundation
import TunnelPKI
import TunnelServer

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// `edgetunnel status`: the agents connected to a server, as a table.
struct StatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Show the agents connected to a tunnel server (its /v1/agents).")

    @Option(help: "The server's meta address.") var server = "http://127.0.0.1:10265"
    @Option(help: "text or json.") var output: OutputFormat = .text

    struct Body: Decodable {
        var serverID: String
        var agents: [TunnelServer.AgentInfo]
    }

    func run() async throws {
        do {
            guard let url = URL(string: server.hasSuffix("/") ? server + "v1/agents" : server + "/v1/agents"),
                url.scheme == "http" || url.scheme == "https"
            else {
                throw PKIError(.invalidArgument, "invalid --server \"\(server)\": expected http://HOST:PORT")
            }
            let data: Data
            do {
                let (body, response) = try await URLSession.shared.data(from: url)
                guard let http = response as? HTTPURLResponse, http.statusCode == 200 else {
                    throw PKIError(.invalidArgument, "\(url) answered \((response as? HTTPURLResponse)?.statusCode ?? 0)")
                }
                data = body
            } catch let error as PKIError {
                throw error
            } catch {
                throw PKIError(.invalidArgument, "cannot reach \(url): \(error.localizedDescription)")
            }
            if output == .json {
                print(String(decoding: data, as: UTF8.self))
                return
            }
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            let body: Body
            do {
                body = try decoder.decode(Body.self, from: data)
            } catch {
                throw PKIError(.invalidArgument, "\(url) did not return an agent list")
            }
            let now = Date()
            var table = [["NODE", "IPS", "CONNECTED", "REMOTE", "STREAMS", "BYTES IN", "BYTES OUT"]]
            for agent in body.agents {
                table.append([
                    agent.nodeName, agent.nodeIPs.joined(separator: ","),
                    Durations.format(now.timeIntervalSince(agent.connectedSince)), agent.remoteAddress,
                    "\(agent.streams)", "\(agent.bytesFromAgent)", "\(agent.bytesToAgent)",
                ])
            }
            print("server \(body.serverID): \(body.agents.count) agent(s)")
            print(TextTable.render(table))
        } catch let error as PKIError {
            printError(error.message)
            throw ExitCode.failure
        }
    }
}
