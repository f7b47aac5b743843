import NIOCore

/// Limits of one tunnel connection.
public struct TunnelLimits: Sendable {
    /// Initial receive window of a stream.
    public var initialWindow = 1 << 20
    /// A stream's receive window grows up to this while its sender keeps it full and its reader keeps up.
    public var maximumWindow = 16 << 20
    /// Sum of all stream receive windows of the connection: bounds the memory a peer can make us hold.
    public var connectionWindowBudget = 256 << 20
    /// Streams open at once on one connection (for the server: streams per agent).
    public var maxStreams = 65_536
    /// Streams of one connection waiting for the agent's OPEN_OK or OPEN_FAIL (server side).
    public var maxPendingOpens = 1024
    /// How long the server waits for the agent's answer to an OPEN; then the stream is reset and fails (504).
    public var openTimeout: TimeAmount = .seconds(15)
    /// Receive windows granted over every connection of the process; `nil`: only the per-connection budget.
    public var processBudget: WindowBudget?
    /// The smallest window a stream starts with once the budgets are used up by larger ones (and the least a
    /// stream needs from the process budget to open at all).
    public var minimumWindow = 16 * 1024
    /// The highest stream id the server opens; ids are never reused, so a connection that reaches it asks its
    /// agent to reconnect (GOAWAY) and the next streams go over the new connection.
    public var lastStreamID: UInt32 = UInt32.max - 1
    /// Replies the peer made us owe (PONG, OPEN_FAIL, RST) while it did not read what we already sent: past this
    /// the connection is closed, so a peer that sends PINGs and never reads cannot grow our write buffer
    /// (HTTP/2 stacks bound their outbound control frames the same way).
    public var maxUnreadReplies = 1024
    /// PINGs a peer may send: bursts of `pingBurst`, `pingsPerSecond` on average. Keepalive sends one every 3 s
    /// (the server one every 5 s on a quiet tunnel), and the agent about 2 a second while data moves (its fast
    /// loss detection, ``Keepalive/Active``, which also confirms ended streams); faster is a protocol error that
    /// closes the connection. 8 leaves room; servers before it allowed 4, which the agent keeps to.
    public var pingBurst = 32
    public var pingsPerSecond = 8.0
    /// Below this rate (bytes/s) a busy tunnel is *paced*: its link, not its peer or the CPU, is the bottleneck, and
    /// bytes would queue ahead of every other stream's frames. 12.5 MB/s is 100 Mbit/s: at that rate the kernel's
    /// own send buffer (about 850 KiB measured) alone is 70 ms of waiting. A paced tunnel keeps its queue short
    /// (``SocketTuning/pacedNotSentLowat``, small frames and flushes) and lets a small reply go first; a fast one
    /// (loopback, a LAN) sends in large frames and batches, where they cost least per byte.
    public var pacedBelowBytesPerSecond = 12_500_000
    /// A paced tunnel that moves more than this (bytes/s) is fast again (hysteresis, 200 Mbit/s).
    public var fastAboveBytesPerSecond = 25_000_000
    /// How often a busy tunnel's rate is judged.
    public var rateInterval: TimeAmount = .milliseconds(500)
    /// The largest DATA payload a paced tunnel sends: a small reply of another stream waits behind at most one
    /// such frame (32 KiB is 7 ms at 40 Mbit/s, where a 256 KiB frame would be 55 ms).
    public var pacedFrameSize = 16 * 1024
    /// The largest DATA payload of a paced tunnel while other streams wait for their turn.
    public var pacedSharedFrameSize = 8 * 1024
    /// DATA a paced tunnel writes between two flushes.
    public var pacedFlushBatch = 8 * 1024
    /// DATA a fast tunnel writes between two flushes.
    public var fastFlushBatch = 256 * 1024
    /// Unsent bytes in a paced tunnel's socket past which it writes no more DATA (at least; 3 ms of its measured
    /// rate when that is more): `TCP_NOTSENT_LOWAT` alone lets each write append to the socket's last buffer up to
    /// its 64 KiB segment goal, and 16–65 KiB waited unsent on the 40 Mbit/s link, 3–13 ms ahead of every reply.
    public var pacedUnsentLimit = 12 * 1024
    /// How soon a paced tunnel held back by ``pacedUnsentLimit`` looks again.
    public var pacedUnsentRecheck: TimeAmount = .milliseconds(1)
    /// Socket bytes read and not yet sent, over all streams of the connection, past which no stream's socket is
    /// read while the tunnel is not writable. Below it a stream with nothing waiting keeps reading (one read at
    /// most: its socket pauses while its bytes wait), so a small reply is in line at once rather than after the
    /// tunnel drained.
    public var queuedDataLimit = 1 << 20
    /// The most streams one side lists in its RESUME (about 90 bytes each in JSON, well inside one frame); the
    /// rest of a resumed tunnel's streams are reset.
    public var maxResumedStreams = 2048
    /// Bytes a resumable tunnel keeps, over all its streams, to send again after a resume (each stream at most the
    /// peer's window): a stream that would go past it keeps nothing more, and is reset if the connection is lost.
    public var maxRetained = 64 << 20
    /// What all resumable tunnels of the process keep together (shared by every connection's limits); nil: no
    /// bound beyond each tunnel's.
    public var processRetained: RetainedBudget?

    public init() {}
}

/// Outcome of opening a stream from this side.
public enum OpenResult: Sendable {
    case opened(streamID: UInt32)
    case failed(OpenFail)
}
