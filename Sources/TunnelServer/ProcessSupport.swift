import Dispatch
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
