import ArgumentParser
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
        @Option(name: .customLong("pki-dir"), help: "PKI folder with the tunnel CA and its key (certificates are issued in memory).")
        var pkiDir: String
        @Option(help: "Agents to run.") var agents: Int = 1000
        @Option(help: "Node names are PREFIX0, PREFIX1, ...") var prefix = "swarm-"
        @Option(help: "Event loop threads shared by all agents.") var threads = 2
        @Option(help: "Print a report this often (seconds).") var interval: Double = 1

        func run() async throws {
            ProcessSupport.bootstrapLogging(level: .critical)
            ProcessSupport.raiseFileLimit()
            let logger = Logger(label: "edgetunnel-swarm")
            let swarm: [EdgeTunnelAgent]
            let group: MultiThreadedEventLoopGroup
            do {
                guard agents > 0 else { throw ConfigurationError("invalid --agents \(agents): must be at least 1") }
                guard threads > 0 else { throw ConfigurationError("invalid --threads \(threads): must be at least 1") }
                guard interval > 0 else { throw ConfigurationError("invalid --interval \(interval): must be above 0") }
                group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
                let ca = try CertificateAuthority.load(from: PKIPaths(directory: pkiDir))
                swarm = try (0..<agents).map { index in
                    let name = "\(prefix)\(index)"
                    let issued = try ca.issueNodeCertificate(nodeName: name)
                    let configuration = AgentConfiguration(
                        nodeName: name, serverAddresses: [server], allowList: AllowList(rules: []))
                    let agent = try EdgeTunnelAgent(configuration: configuration, logger: logger, group: group)
                    agent.useCredentials(
                        AgentCredentials(certificate: issued.certificate, privateKey: issued.privateKey, ca: ca.certificate))
                    return agent
                }
            } catch {
                printError("\(error)")
                throw ExitCode.failure
            }
            let start = NIODeadline.now()
            for agent in swarm { Task { await agent.run() } }
            let reporter = Task {
                while !Task.isCancelled {
                    let connected = swarm.reduce(0) { $0 + ($1.connectedAddress == nil ? 0 : 1) }
                    let elapsed = Double((NIODeadline.now() - start).nanoseconds) / 1e9
                    print(#"{"elapsed_s":\#(elapsed),"agents":\#(swarm.count),"connected":\#(connected)}"#)
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

/// Opens `count` CONNECT streams, `concurrency` at a time, on one event loop.
final class StreamLoad: @unchecked Sendable {
    let loop: EventLoop
    let forwarder: Forwarder
    let count: Int
    let concurrency: Int
    let hold: Bool
    // State below lives on `loop`.
    private var started = 0
    private var finished = 0
    private var failures = 0
    private var firstError: String?
    private var latencies: [Double] = []
    private var held: [Channel] = []
    private var begin = NIODeadline.now()

    init(loop: EventLoop, forwarder: Forwarder, count: Int, concurrency: Int, hold: Bool) {
        self.loop = loop
        self.forwarder = forwarder
        self.count = count
        self.concurrency = concurrency
        self.hold = hold
        latencies.reserveCapacity(count)
    }

    /// Runs the load and returns the JSON report and the number of streams that failed.
    func run() async throws -> (String, Int) {
        let done = loop.makePromise(of: Void.self)
        loop.execute {
            self.begin = .now()
            for _ in 0..<min(self.concurrency, self.count) { self.launch(done) }
        }
        try await done.futureResult.get()
        return try await loop.submit { (self.report(), self.failures) }.get()
    }

    private func launch(_ done: EventLoopPromise<Void>) {
        started += 1
        let t0 = NIODeadline.now()
        forwarder.openStream(on: loop).whenComplete { result in
            switch result {
            case .success(let channel):
                self.latencies.append(Double((NIODeadline.now() - t0).nanoseconds) / 1e6)
                if self.hold { self.held.append(channel) } else { channel.close(promise: nil) }
            case .failure(let error):
                self.failures += 1
                if self.firstError == nil { self.firstError = "\(error)" }
            }
            self.finished += 1
            if self.started < self.count {
                self.launch(done)
            } else if self.finished == self.count {
                done.succeed(())
            }
        }
    }

    private func report() -> String {
        let seconds = Double((NIODeadline.now() - begin).nanoseconds) / 1e9
        let sorted = latencies.sorted()
        func percentile(_ p: Double) -> Double {
            sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
        }
        let error = (firstError ?? "").replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "'")
        return #"{"streams":\#(count),"opened":\#(latencies.count),"failures":\#(failures),"seconds":\#(seconds),"#
            + #""streams_per_second":\#(Double(latencies.count) / seconds),"#
            + #""connect_to_200_ms":{"p50":\#(percentile(0.5)),"p99":\#(percentile(0.99))},"first_error":"\#(error)"}"#
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
            print(#"{"iterations": \#(iterations), "head_path_ns": \#(Int(path)), "decoder_only_ns": \#(Int(decoder))}"#)
        }
    }
}
