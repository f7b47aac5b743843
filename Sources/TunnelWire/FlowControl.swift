/// Credit the peer has given us to send on one stream.
public struct SendWindow: Sendable, Equatable {
    /// Bytes we may still send.
    public private(set) var available: Int

    public init(initial: Int) { available = max(0, initial) }

    public mutating func consume(_ count: Int) {
        precondition(count <= available, "sent beyond the peer's window")
        available -= count
    }

    /// Adds a WINDOW increment; a total beyond 2^31-1 is a protocol error (as in HTTP/2).
    public mutating func grant(_ increment: UInt32) throws {
        let total = available + Int(increment)
        guard total <= Int(Int32.max) else { throw FrameError("WINDOW increment overflows the send window") }
        available = total
    }
}

/// What we allow the peer to send on one stream, and when to tell it that it may send more.
///
/// The receiver credits bytes back once they have left our buffers (written to the socket), so memory held for
/// a stream never exceeds its window: a reader that stops reading stops its sender and nobody else.
///
/// Auto-tuning: when the sender keeps the window nearly exhausted while we drain promptly (our socket is
/// writable), the window, not the reader, is the bottleneck — typical on a long fat link — and the window
/// doubles, up to `maximum`. A slow reader never grows its window because its socket is not writable.
public struct ReceiveWindow: Sendable, Equatable {
    /// The current window size.
    public private(set) var size: Int
    public let maximum: Int
    /// Bytes the peer may still send before it runs out of credit.
    public private(set) var outstanding: Int
    /// Bytes received and consumed that have not been credited back yet.
    public private(set) var uncredited = 0
    /// The sender ran low on credit since the last update.
    private var senderLimited = false

    public init(initial: Int, maximum: Int) {
        size = initial
        self.maximum = max(initial, maximum)
        outstanding = initial
    }

    /// Accounts for `count` received bytes; throws when the peer sent beyond its credit.
    public mutating func receive(_ count: Int) throws {
        guard count <= outstanding else {
            throw FrameError("peer sent \(count) bytes with only \(outstanding) bytes of window")
        }
        outstanding -= count
        if outstanding < size / 4 { senderLimited = true }
    }

    /// Result of ``consumed(_:mayGrow:)``: the WINDOW increment to send (if any) and by how much the window grew.
    public struct Update: Sendable, Equatable {
        public var increment: UInt32
        public var growth: Int
    }

    /// Accounts for `count` bytes that left our buffers. Returns a WINDOW update once a quarter of the window
    /// is waiting to be credited (batching updates), or at once when the sender is starved.
    /// `mayGrow`: the consumer drains promptly and the connection-wide budget allows a larger window.
    public mutating func consumed(_ count: Int, mayGrow: Bool) -> Update? {
        uncredited += count
        guard uncredited >= size / 4 || (senderLimited && uncredited > 0) else { return nil }
        var growth = 0
        if senderLimited && mayGrow && size < maximum {
            growth = min(size, maximum - size)
            size += growth
        }
        let increment = uncredited + growth
        outstanding += increment
        uncredited = 0
        senderLimited = false
        return Update(increment: UInt32(increment), growth: growth)
    }
}
