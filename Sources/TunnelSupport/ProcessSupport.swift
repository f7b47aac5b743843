import Dispatch
import Foundation
import Logging
import TunnelWire

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

    /// Raises the open-file limit to its hard maximum: a server carrying thousands of agents and streams, or an
    /// agent carrying thousands of streams, needs a descriptor for each (the soft limit is often 1024).
    public static func raiseFileLimit() {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < limit.rlim_max else { return }
        limit.rlim_cur = limit.rlim_max
        _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
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

    /// Logs to stderr at `level`: swift-log's text lines, or one JSON object a line for log pipelines.
    public static func bootstrapLogging(level: Logger.Level, json: Bool = false) {
        LoggingSystem.bootstrap { label in
            if json {
                var handler = JSONLogHandler(label: label)
                handler.logLevel = level
                return handler
            }
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return EscapingLogHandler(handler)
        }
    }

    /// Parses `--log-format`.
    public static func parseLogFormat(_ text: String) throws -> Bool {
        switch text {
        case "text": return false
        case "json": return true
        default: throw LogFormatError(description: "invalid --log-format \"\(text)\": use text or json")
        }
    }

    public struct LogFormatError: Error, CustomStringConvertible {
        public let description: String
    }
}

extension Logger.Level {
    /// Parses `--log-level`.
    public init?(flag: String) {
        self.init(rawValue: flag.lowercased())
    }
}

/// Text log lines that a peer cannot split or forge: the message and every metadata value have their control
/// characters escaped and are shortened (``PeerText``), whatever a call site forgot to quote.
public struct EscapingLogHandler: LogHandler {
    /// The longest message or metadata value written, in characters.
    public static let messageLimit = 4096
    private var inner: StreamLogHandler

    public init(_ inner: StreamLogHandler) { self.inner = inner }

    public var logLevel: Logger.Level {
        get { inner.logLevel }
        set { inner.logLevel = newValue }
    }

    public var metadata: Logger.Metadata {
        get { inner.metadata }
        set { inner.metadata = newValue }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { inner[metadataKey: key] }
        set { inner[metadataKey: key] = newValue }
    }

    public func log(event: LogEvent) {
        var event = event
        event.message = "\(PeerText.bounded(event.message.description, limit: Self.messageLimit))"
        if let metadata = event.metadata {
            event.metadata = metadata.mapValues { .string(PeerText.bounded("\($0)", limit: Self.messageLimit)) }
        }
        inner.log(event: event)
    }
}

/// One JSON object a line on stderr: `time`, `level`, `logger`, `message`, and the metadata as string fields.
public struct JSONLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level = .info
    private let label: String
    private static let lock = NSLock()

    public init(label: String) { self.label = label }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var fields: [String: String] = [:]
        for (key, value) in metadata.merging(event.metadata ?? [:], uniquingKeysWith: { $1 }) {
            fields[key] = "\(value)"
        }
        fields["time"] = Date().formatted(.iso8601)
        fields["level"] = event.level.rawValue
        fields["logger"] = label
        fields["message"] = PeerText.bounded(event.message.description, limit: EscapingLogHandler.messageLimit)
        if let error = event.error { fields["error"] = PeerText.bounded("\(error)", limit: EscapingLogHandler.messageLimit) }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard var data = try? encoder.encode(fields) else { return }
        data.append(UInt8(ascii: "\n"))
        Self.lock.lock()
        defer { Self.lock.unlock() }
        FileHandle.standardError.write(data)
    }
}
