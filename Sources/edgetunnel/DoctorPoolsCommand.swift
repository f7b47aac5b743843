import ArgumentParser
import EdgePlan
import Foundation
import TunnelPKI
import TunnelSupport

/// `edgetunnel doctor --pool NAME --expect private|internet`: are a pool's agents connected over the path they
/// should be? Read from a server's `/v1/agents`. An option group of ``DoctorCommand``, whose other checks it may
/// join in one run.
struct PoolDoctorOptions: ParsableArguments {
    @Option(
        name: .customLong("pool"),
        help: """
            An edge pool whose agents to check on a live server (repeatable): NAME, with --expect, or \
            NAME=private|internet|express-connect.
            """)
    var pools: [String] = []
    @Option(
        name: .customLong("expect"),
        help: "The path the --pool agents should use: private (express-connect) or internet.")
    var expect: String?
    @Option(name: .customLong("server"), help: "With --pool: the server's meta address, whose /v1/agents is read.")
    var server = "http://127.0.0.1:10265"

    var isRequested: Bool { !pools.isEmpty }

    /// `private`, `internet`, or a pool's connectivity (`express-connect` is `private`).
    static func path(_ text: String, what: String) throws -> TunnelPath {
        switch text {
        case "private", "express-connect": return .private
        case "internet": return .internet
        default:
            throw ConfigurationError("invalid \(what) \"\(text)\": expected private (express-connect) or internet")
        }
    }

    /// Each pool with the path its agents should use.
    func expectations() throws -> [(pool: String, path: TunnelPath)] {
        if expect != nil, pools.isEmpty { throw ConfigurationError("--expect goes with --pool NAME") }
        let fallback = try expect.map { try Self.path($0, what: "--expect") }
        return try pools.map { flag in
            let parts = flag.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            let name = try PoolName.validate(parts[0], what: "--pool")
            if parts.count == 2 { return (name, try Self.path(parts[1], what: "--pool \(name)")) }
            guard let fallback else {
                throw ConfigurationError(
                    "--pool \(name): give the path its agents should use with --expect private|internet, or as \(name)=private"
                )
            }
            return (name, fallback)
        }
    }

    /// The pool checks; none without `--pool`. A `--server` that is no address is bad input (thrown); a server
    /// that cannot be read is a failed check.
    func results() async throws -> [CheckResult] {
        let expected = try expectations()
        guard !expected.isEmpty else { return [] }
        let body: AgentList.Body
        do {
            body = try await AgentList.fetch(server: server)
        } catch let error as ConfigurationError where error.description.hasPrefix("invalid --server") {
            throw error
        } catch {
            return [
                CheckResult(
                    "agents \(server)", .fail, "\(error)",
                    fix: "give --server the meta address (port 10265) of a running tunnel server")
            ]
        }
        return expected.map {
            Doctor.checkPool($0.pool, expected: $0.path, agents: body.agents, server: "server \(body.serverID)")
        }
    }
}
