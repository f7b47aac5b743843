import Foundation
import NIOCore
import TunnelSupport

/// The load of `edgetunnel bench streams`: opens `count` CONNECT streams through a ``Forwarder``, `concurrency` at a
/// time, on one event loop, and reports the set-up rate and the connect-to-200 latency as one JSON object.
public final class StreamLoad: @unchecked Sendable {
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

    public init(loop: EventLoop, forwarder: Forwarder, count: Int, concurrency: Int, hold: Bool) {
        self.loop = loop
        self.forwarder = forwarder
        self.count = count
        self.concurrency = concurrency
        self.hold = hold
        latencies.reserveCapacity(count)
    }

    /// Runs the load and returns the JSON report and the number of streams that failed.
    public func run() async throws -> (String, Int) {
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
        let error = (firstError ?? "").replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(
            of: "\"", with: "'")
        return #"{"streams":\#(count),"opened":\#(latencies.count),"failures":\#(failures),"seconds":\#(seconds),"#
            + #""streams_per_second":\#(Double(latencies.count) / seconds),"#
            + #""connect_to_200_ms":{"p50":\#(percentile(0.5)),"p99":\#(percentile(0.99))},"first_error":"\#(error)"}"#
    }
}
