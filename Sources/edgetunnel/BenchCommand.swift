import ArgumentParser
import EdgeTunnelTools
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TunnelAgent
import TunnelPKI
import TunnelServer
import TunnelSupport

/// `edgetunnel bench`: load generators that `scripts/bench` drives; each prints one JSON object a report.
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Load generators for the benchmark suite (scripts/bench): stream set-up and agent swarms.",
        subcommands: [Streams.self, Swarm.self, Heads.self]
    )

    /// Opens CONNECT streams as fast as the server and agent set them up, and reports the rate and the time
    /// from connecting to the `200`; or opens them and holds them idle (footprint).
    struct Streams: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Open CONNECT streams through the tunnel: the set-up rate and connect-to-200 latency.")

        @Option(help: "The server's secure port HOST:PORT, or unix:PATH for its Unix socket.") var server: String
        @Option(name: .customLong("ca-file"), help: "CA of the server's certificate (TLS only).") var caFile: String?
        @Option(help: "Client certificate (TLS only).") var cert: String?
        @Option(help: "Key of the client certificate (TLS only).") var key: String?
        @Option(help: "Destination NODE:PORT.") var to: String
        @Option(help: "Streams to open.") var count: Int = 10_000
        @Option(help: "Streams being set up at once.") var concurrency: Int = 50
        @Flag(help: "Keep the streams open (idle) after reporting, until SIGTERM.") var hold = false

        func run() async throws {
            ProcessSupport.bootstrapLogging(level: .error)
            ProcessSupport.raiseFileLimit()
            let forwarder: Forwarder
            do {
                guard count > 0 else { throw ConfigurationError("invalid --count \(count): must be at least 1") }
                guard concurrency > 0 else {
                    throw ConfigurationError("invalid --concurrency \(concurrency): must be at least 1")
                }
                let endpoint = try Forwarder.Endpoint(server: server, caFile: caFile, cert: cert, key: key)
                guard let target = HostPort(authority: to) else {
                    throw ConfigurationError("invalid --to \"\(to)\": expected NODE:PORT")
                }
                forwarder = Forwarder(endpoint: endpoint, target: target, logger: Logger(label: "edgetunnel-bench"))
            } catch {
                printError("\(error)")
                throw ExitCode.failure
            }
            let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
            let load = StreamLoad(
                loop: group.next(), forwarder: forwarder, count: count, concurrency: concurrency, hold: hold)
            let (report, failures) = try await load.run()
            print(report)
            fflush(stdout)
            if hold { _ = await ProcessSupport.waitForSignal() }
            try? await group.shutdownGracefully()
            if failures > 0 { throw ExitCode.failure }
        }
    }

    /// Holds many agent tunnels to one server from one process, each with its own node certificate: the
    /// server's footprint per agent and how fast all come back after it restarts.
    struct Swarm: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run N agents in one process (each its own node certificate) against one server.")

        @Option(help: "The server's tunnel port HOST:PORT.") var server: String
        @Option(
            name: .customLong("pki-dir"),
            help: "PKI folder with the tunnel CA and its key (certificates are issued in memory).")
        var pkiDir: String
        @Option(help: "Agents to run.") var agents: Int = 1000
        @Option(help: "Node names are PREFIX0, PREFIX1, ...") var prefix = "swarm-"
        @Option(help: "Event loop threads shared by all agents.") var threads = 2
        @Option(help: "Print a report this often (seconds).") var interval: Double = 1
        @Option(
            name: .customLong("source-network"),
            help:
                "Each agent leaves from its own address A.B.x.y in this IPv4 /16 (A.B.0.0, on loopback), as edge nodes do."
        )
        var sourceNetwork: String?

        func run() async throws {
            ProcessSupport.bootstrapLogging(level: .critical)
            ProcessSupport.raiseFileLimit()
            let logger = Logger(label: "edgetunnel-swarm")
            let swarm: AgentSwarm
            let group: MultiThreadedEventLoopGroup
            do {
                guard agents > 0 else { throw ConfigurationError("invalid --agents \(agents): must be at least 1") }
                guard threads > 0 else { throw ConfigurationError("invalid --threads \(threads): must be at least 1") }
                guard interval > 0 else { throw ConfigurationError("invalid --interval \(interval): must be above 0") }
                let network = try sourceNetwork.map { text in
                    guard let address = IPAddress(text) else {
                        throw ConfigurationError("invalid --source-network \(text): not an IP address")
                    }
                    return address
                }
                group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
                swarm = try AgentSwarm(
                    server: server, ca: try CertificateAuthority.load(from: PKIPaths(directory: pkiDir)),
                    agents: agents, prefix: prefix, group: group, logger: logger, sourceNetwork: network)
            } catch {
                printError("\(error)")
                throw ExitCode.failure
            }
            let start = NIODeadline.now()
            swarm.start()
            let reporter = Task {
                while !Task.isCancelled {
                    let connected = swarm.connectedCount
                    let elapsed = Double((NIODeadline.now() - start).nanoseconds) / 1e9
                    print(#"{"elapsed_s":\#(elapsed),"agents":\#(swarm.agents.count),"connected":\#(connected)}"#)
                    fflush(stdout)
                    try? await Task.sleep(for: .milliseconds(Int(interval * 1000)))
                }
            }
            _ = await ProcessSupport.waitForSignal()
            reporter.cancel()
            // Nothing flows through a swarm: no drain, the process exit closes every tunnel at once.
            Foundation.exit(0)
        }
    }
}

extension BenchCommand {
    /// `edgetunnel bench heads`: the server's request-head path and NIOHTTP1's decoder alone, one JSON line.
    struct Heads: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Time the server's request-head path (decode, route, encode) on a kubelet request head.")

        @Option(help: "Heads parsed by each.") var iterations: Int = 200_000

        func run() throws {
            guard iterations >= 1 else { throw ValidationError("--iterations must be at least 1") }
            let (path, decoder) = try RequestHeadBenchmark.run(iterations: iterations)
            print(
                #"{"iterations": \#(iterations), "head_path_ns": \#(Int(path)), "decoder_only_ns": \#(Int(decoder))}"#)
        }
    }
}
