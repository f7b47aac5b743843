import NIOConcurrencyHelpers
import NIOCore

/// Streams open per caller identity, so that one caller (one client certificate, one source address on the
/// insecure port) cannot take every stream the server can carry. Each caller connection carries one stream.
/// Thread-safe.
final class CallerStreams: @unchecked Sendable {
    let limit: Int
    private let lock = NIOLock()
    private var open: [String: Int] = [:]

    init(limit: Int) { self.limit = limit }

    /// Counts a stream for `caller` until `channel` closes; false (nothing counted) at the limit.
    func admit(_ caller: String, until channel: Channel) -> Bool {
        let admitted = lock.withLock {
            let count = open[caller, default: 0]
            guard count < limit else { return false }
            open[caller] = count + 1
            return true
        }
        if admitted {
            channel.closeFuture.whenComplete { _ in self.release(caller) }
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
