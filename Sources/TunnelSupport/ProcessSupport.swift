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

    /// Keeps glibc's allocator from handing memory back to the kernel after every large free. With its defaults
    /// (a trim threshold of 128 KiB, adjusted as it goes) the server returned the top of an event loop's arena with
    /// `madvise` whenever a few large buffers were freed and touched fresh zero pages for the next ones: a TLS
    /// caller's bulk transfer through a resumable tunnel (whose kept bytes make swift-nio-ssl take a new plaintext
    /// buffer for every read) cost 145,000 page faults per GB and about 17% more relay CPU
    /// (docs/benchmarks.md). Free memory up to `trimThreshold` now stays at the top of each arena, mappings start
    /// at 1 MiB, and a variable the operator set (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_`,
    /// `MALLOC_MMAP_THRESHOLD_`) wins.
    public static func tuneAllocator(trimThreshold: Int = 8 << 20) {
        #if canImport(Glibc)
        // <malloc.h> is not in Swift's Glibc module: mallopt is looked up, with its parameters' values from it.
        typealias Mallopt = @convention(c) (Int32, Int32) -> Int32
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallopt") else { return }
        let mallopt = unsafeBitCast(symbol, to: Mallopt.self)
        // M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD.
        let (trim, topPad, mmapThreshold): (Int32, Int32, Int32) = (-1, -2, -3)
        let environment = ProcessInfo.processInfo.environment
        if environment["MALLOC_TRIM_THRESHOLD_"] == nil { _ = mallopt(trim, Int32(trimThreshold)) }
        if environment["MALLOC_TOP_PAD_"] == nil { _ = mallopt(topPad, 2 << 20) }
        if environment["MALLOC_MMAP_THRESHOLD_"] == nil { _ = mallopt(mmapThreshold, 1 << 20) }
        #endif
    }

    /// Calls `handler` (on a private queue) every time `number` arrives, e.g. SIGHUP for a reload. Keep the
    /// returned source alive.
    public static func onSignal(_ number: Int32, _ handler: @escaping @Sendable () -> Void) -> DispatchSourceSignal {
        signal(number, SIG_IGN)
        let source = DispatchSource.makeSignalSource(
            signal: number, queue: DispatchQueue(label: "edgetunnel.signal.\(number)"))
        source.setEventHandler(handler: handler)
        source.resume()
        return source
    }

    /// Values of a repeatable flag that may also be comma-separated (`--cert-ips a,b --cert-ips c`).
    public static func splitList(_ values: [String]) -> [String] {
        values.flatMap { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } }.filter {
            !$0.isEmpty
        }
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
public struct EscapingLogHandler<Inner: LogHandler>: LogHandler {
    private var inner: Inner

    public init(_ inner: Inner) { self.inner = inner }

    public var logLevel: Logger.Level {
        get { inner.logLevel }
        set { inner.logLevel = newValue }
    }

    /// The logger's own metadata (`logger[metadataKey:]`) is escaped as it is set: it is printed on every line.
    public var metadata: Logger.Metadata {
        get { inner.metadata }
        set { inner.metadata = newValue.mapValues(LogText.escaped) }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { inner[metadataKey: key] }
        set { inner[metadataKey: key] = newValue.map(LogText.escaped) }
    }

    public func log(event: LogEvent) {
        var event = event
        event.message = "\(LogText.bounded(event.message.description))"
        event.metadata = event.metadata?.mapValues(LogText.escaped)
        inner.log(event: event)
    }
}

/// What log handlers do to text that may come from a peer.
public enum LogText {
    /// The longest message or metadata value written, in characters.
    public static let limit = 4096

    /// `text` with control characters escaped, at most ``limit`` characters (``PeerText``).
    public static func bounded(_ text: String) -> String { PeerText.bounded(text, limit: limit) }

    /// A metadata value as one bounded, escaped string.
    static func escaped(_ value: Logger.Metadata.Value) -> Logger.Metadata.Value { .string(bounded("\(value)")) }
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
        guard let data = Self.line(for: event, label: label, metadata: metadata) else { return }
        Self.lock.lock()
        defer { Self.lock.unlock() }
        FileHandle.standardError.write(data)
    }

    /// The line written for `event`, newline included: every value bounded and escaped (``LogText``).
    static func line(for event: LogEvent, label: String, metadata: Logger.Metadata) -> Data? {
        var fields: [String: String] = [:]
        for (key, value) in metadata.merging(event.metadata ?? [:], uniquingKeysWith: { $1 }) {
            fields[LogText.bounded(key)] = LogText.bounded("\(value)")
        }
        fields["time"] = Date().formatted(.iso8601)
        fields["level"] = event.level.rawValue
        fields["logger"] = label
        fields["message"] = LogText.bounded(event.message.description)
        if let error = event.error { fields["error"] = LogText.bounded("\(error)") }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard var data = try? encoder.encode(fields) else { return nil }
        data.append(UInt8(ascii: "\n"))
        return data
    }
}
