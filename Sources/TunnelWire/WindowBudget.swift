import NIOConcurrencyHelpers

/// Bytes of receive window granted across every tunnel connection of a process: what all peers together can make
/// the process hold for streams whose readers are slow. Thread-safe.
///
/// A stream's minimum window may draw on the whole limit; what a stream gets above its minimum (a larger initial
/// window, later growth) only on a share of it (``extraLimit``, a quarter by default). So when many streams are
/// open, new ones start with the minimum window and grow no more, rather than being refused: with 512 MiB and
/// 16 KiB minimums at least 24,576 streams fit, whatever the others took. A stream is refused (503) only when not
/// even its minimum fits.
public final class WindowBudget: @unchecked Sendable {
    public let limit: Int
    /// What windows may hold above their minimums, together.
    public let extraLimit: Int
    private let lock = NIOLock()
    private var used = 0
    private var extraUsed = 0

    public init(limit: Int, extraShare: Double = 0.25) {
        self.limit = limit
        self.extraLimit = Int(Double(limit) * extraShare)
    }

    /// Bytes granted now.
    public var inUse: Int { lock.withLock { used } }

    /// A new stream's window: `minimum`, and as much of the rest of `wanted` as the extra share allows; nil
    /// (nothing taken) when not even `minimum` is left.
    func takeWindow(_ wanted: Int, minimum: Int) -> Int? {
        lock.withLock {
            guard used + minimum <= limit else { return nil }
            let extra = max(0, min(wanted - minimum, extraLimit - extraUsed, limit - used - minimum))
            used += minimum + extra
            extraUsed += extra
            return minimum + extra
        }
    }

    /// Growth of a window by `count`: all of it, from the extra share, or nothing.
    func takeGrowth(_ count: Int) -> Bool {
        lock.withLock {
            guard extraUsed + count <= extraLimit, used + count <= limit else { return false }
            used += count
            extraUsed += count
            return true
        }
    }

    /// Growth taken but not used.
    func giveGrowth(_ count: Int) {
        lock.withLock {
            used -= count
            extraUsed -= count
        }
    }

    /// A closed stream's whole window, of which `minimum` came from the minimum part.
    func release(window size: Int, minimum: Int) {
        lock.withLock {
            used -= size
            extraUsed -= max(0, size - minimum)
        }
    }
}
