import NIOConcurrencyHelpers
import NIOCore

/// Streams open per caller identity, so that one caller (one client certificate, one source address on the
/// insecure port, a gRPC socket) cannot take every stream the server can carry.
/// Thread-safe.
final class CallerStreams: @unchecked Sendable {
    let limit: Int
    private let lock = NIOLock()
    private var open: [String: Int] = [:]

    init(limit: Int) { self.limit = limit }

    /// Counts a stream for `caller` until `channel` closes; false (nothing counted) at the limit.
    func admit(_ caller: String, until channel: Channel) -> Bool {
        admit(caller, until: channel.closeFuture)
    }

    /// Counts a stream for `caller` until `ended` completes (a frontend that carries several streams on one
    /// connection ends each on its own); false (nothing counted) at the limit.
    func admit(_ caller: String, until ended: EventLoopFuture<Void>) -> Bool {
        let admitted = lock.withLock {
            let count = open[caller, default: 0]
            guard count < limit else { return false }
            open[caller] = count + 1
            return true
        }
        if admitted {
            ended.whenComplete { _ in self.release(caller) }
        }
        return admitted
    }

    private func release(_ caller: String) {
        lock.withLock {
            let count = open[caller, default: 1] - 1
            open[caller] = count > 0 ? count : nil
        }
    }
}
