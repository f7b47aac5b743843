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

    public init() {}
}

/// Outcome of opening a stream from this side.
public enum OpenResult: Sendable {
    case opened(streamID: UInt32)
    case failed(OpenFail)
}
