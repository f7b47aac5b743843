import ArgumentParser
import TunnelPKI
import TunnelSupport

#if canImport(Glibc)
import Glibc
#endif

@main
struct EdgeTunnelCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "edgetunnel",
        abstract: "Administer an EdgeTunnel cloud-edge tunnel: PKI, tokens, status, forwarding, the network plan, and a local demo.",
        version: EdgeTunnelVersion.current,
        subcommands: [PKICommand.self, TokenCommand.self, NodeCommand.self, DemoCommand.self, StatusCommand.self, ForwardCommand.self, PlanCommand.self,
            ManifestsCommand.self, DoctorWithPoolsCommand.self, ProbeCommand.self, RoutesCommand.self, BenchCommand.self,
        ]
    )
}

/// Output formats for commands that print structured data.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case text, json
}

/// Runs a command body and turns any failure into one line on stderr and a non-zero exit: an operator sees
/// what is wrong with which file or value, never a stack trace.
func reportingErrors<T>(_ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let error as ExitCode {
        throw error
    } catch {
        printError("\(error)")
        throw ExitCode.failure
    }
}

func reportingErrors<T>(_ body: () async throws -> T) async throws -> T {
    do {
        return try await body()
    } catch let error as ExitCode {
        throw error
    } catch {
        printError("\(error)")
        throw ExitCode.failure
    }
}

func printError(_ message: String) {
    let line = "edgetunnel: error: \(message)\n"
    var bytes = Array(line.utf8)
    _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
}
