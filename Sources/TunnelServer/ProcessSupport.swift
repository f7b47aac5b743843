import Dispatch
import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// What the long-running executables share: waiting for SIGTERM/SIGINT, and logging set-up.
public enum ProcessSupport {
    /// Suspends until one of `signals` arrives; returns it.
    public static func waitForSignal(_ signals: [Int32] = [SIGTERM, SIGINT]) async -> Int32 {
        await withCheckedContinuation { continuation in
            let queue = DispatchQueue(label: "edgetunnel.signals")
            var sources: [DispatchSourceSignal] = []
            var resumed = false
            for number in signals {
                signal(number, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
                source.setEventHandler {
                    guard !resumed else { return }
                    resumed = true
                    for source in sources { source.cancel() }
                    continuation.resume(returning: number)
                }
                sources.append(source)
                source.resume()
            }
        }
    }

    /// Calls `handler` (on a private queue) every time `number` arrives, e.g. SIGHUP for a reload. Keep the
    /// returned source alive.
    public static func onSignal(_ number: Int32, _ handler: @escaping @Sendable () -> Void) -> DispatchSourceSignal {
        signal(number, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: number, queue: DispatchQueue(label: "edgetunnel.signal.\(number)"))
        source.setEventHandler(handler: handler)
        source.resume()
        return source
    }

    /// Values of a repeatable flag that may also be comma-separated (`--cert-ips a,b --cert-ips c`).
    public static func splitList(_ values: [String]) -> [String] {
        values.flatMap { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } }.filter { !$0.isEmpty }
    }

    /// One line on stderr, `PROGRAM: error: MESSAGE`, and exit code 1.
    public static func fail(_ program: String, _ message: String) -> Never {
        let line = Array("\(program): error: \(message)\n".utf8)
        _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
        exit(1)
    }

    /// Text logs to stderr at `level`.
    public static func bootstrapLogging(level: Logger.Level) {
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
    }
}

extension Logger.Level {
    /// Parses `--log-level`.
    public init?(flag: String) {
        self.init(rawValue: flag.lowercased())
    }
}
