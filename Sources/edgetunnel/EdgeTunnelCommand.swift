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
        abstract:
            "Administer an EdgeTunnel cloud-edge tunnel: PKI, tokens, status, forwarding, the network plan, and a local demo.",
        version: EdgeTunnelVersion.current,
        subcommands: [
            PKICommand.self, TokenCommand.self, NodeCommand.self, DemoCommand.self, StatusCommand.self,
            ForwardCommand.self, PlanCommand.self,
            ManifestsCommand.self, DoctorCommand.self, ProbeCommand.self, RoutesCommand.self, BenchCommand.self,
        ]
    )
}

/// Output formats for commands that print structured data.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case text, json
}

/// The CLI's one error handler. Runs a command body and turns a failure into one line on stderr and a non-zero
/// exit: an operator sees what is wrong with which file or value, never a stack trace.
///
/// A ``UserFacingError`` (`PKIError`, `ConfigurationError`, `PlanError`) prints its message and exits with
/// `userError`: 1 by default, ``badInput`` (2) for the plan tools, whose 1 means "the plan or a check does not
/// hold". Any other error prints its description and exits 1. An `ExitCode` the body throws, and ArgumentParser's
/// own `ValidationError` and `CleanExit`, pass through.
func reportingErrors<T>(userError: ExitCode = .failure, _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch {
        throw report(error, userError: userError)
    }
}

func reportingErrors<T>(userError: ExitCode = .failure, _ body: () async throws -> T) async throws -> T {
    do {
        return try await body()
    } catch {
        throw report(error, userError: userError)
    }
}

/// What the CLI's handler throws for `error`, after printing it.
private func report(_ error: Error, userError: ExitCode) -> Error {
    switch error {
    case is ExitCode, is ValidationError, is CleanExit:
        return error
    case let error as UserFacingError:
        printError(error.message)
        return userError
    default:
        printError("\(error)")
        return ExitCode.failure
    }
}

func printError(_ message: String) {
    let line = "edgetunnel: error: \(message)\n"
    var bytes = Array(line.utf8)
    _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
}
