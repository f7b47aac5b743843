import Foundation
import Logging
import NIOConcurrencyHelpers
import Testing

@testable import TunnelSupport

/// Peer text cannot split, forge or flood a log line, in either log format.
@Suite struct LogEscapingTests {
    /// Keeps what reaches it, with the logger's own metadata, as the text handler would print it.
    struct Capture: LogHandler {
        let lines: NIOLockedValueBox<[String]>
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            let all = metadata.merging(event.metadata ?? [:]) { $1 }
            let fields = all.keys.sorted().map { "\($0)=\(all[$0]!)" }.joined(separator: " ")
            lines.withLockedValue { $0.append("\(event.level) \(fields) \(event.message)") }
        }
    }

    static let forged = "edge-1\n2026-12-01T00:00:00+0000 critical server : all nodes revoked\u{1b}[2J\u{202e}"

    @Test func textLinesEscapeControlsInTheMessageAndInBothKindsOfMetadataAndAreBounded() {
        let lines = NIOLockedValueBox<[String]>([])
        var logger = Logger(label: "test") { _ in EscapingLogHandler(Capture(lines: lines)) }
        logger[metadataKey: "node"] = "\(Self.forged)"
        logger.warning("registration refused: \(Self.forged)", metadata: ["peer": "\(Self.forged)"])
        logger.info("\(String(repeating: "/", count: 200_000))")
        let written = lines.withLockedValue { $0 }
        #expect(written.count == 2)
        for line in written {
            #expect(!line.contains("\n") && !line.contains("\u{1b}") && !line.contains("\u{202e}"))
        }
        #expect(written[0].components(separatedBy: "edge-1\\n2026-12-01T00:00:00+0000 critical").count == 4)
        #expect(written[0].contains("\\u{1b}[2J"))
        #expect(written[1].count < LogText.limit + 300 && written[1].contains("(195904 more)"))  // with the node field
    }

    @Test func jsonLinesAreOneLineEachAndBounded() throws {
        let event = LogEvent(
            level: .warning, message: "refused: \(Self.forged)",
            metadata: [
                "peer": "\(Self.forged)",
                String(repeating: "k", count: 10_000): "\(String(repeating: "v", count: 100_000))",
            ],
            source: nil, file: #fileID, function: #function, line: #line)
        let data = try #require(JSONLogHandler.line(for: event, label: "test", metadata: ["node": "\(Self.forged)"]))
        let text = String(decoding: data, as: UTF8.self)
        #expect(text.filter { $0 == "\n" }.count == 1 && text.hasSuffix("\n"))
        #expect(data.count < 4 * (LogText.limit + 100))
        let fields = try #require(try JSONSerialization.jsonObject(with: data) as? [String: String])
        #expect(fields["node"]?.hasPrefix("edge-1\\n2026") == true)
        #expect(fields["message"]?.contains("\u{1b}") == false)
    }
}
