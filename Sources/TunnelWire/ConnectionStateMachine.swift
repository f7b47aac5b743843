/// Where a tunnel connection is in its life, as the mux sees it: one value instead of separate flags, every
/// change a named transition. Frames from the peer are taken only while open or draining; new streams only
/// while open. Lives on the tunnel channel's event loop, like the mux.
///
///     open ──drain──▶ draining ──fail──▶ failed ──close──▶ closed
///       │                              ▲                     ▲
///       └────────────fail──────────────┘                     │
///       └──────────────────────close (from any state)────────┘
///     open, draining ──suspend──▶ suspended ──close──▶ closed
public struct ConnectionStateMachine: Sendable, Equatable {
    public enum State: Sendable, Equatable {
        /// Frames flow both ways; streams open.
        case open
        /// No new stream on either side (GOAWAY sent or received, or stream ids ran out); open ones finish.
        case draining
        /// The peer broke the protocol: its further frames are ignored while the connection closes.
        case failed
        /// The connection is gone but its streams wait for a new one to resume on (``TunnelMux/enableResume(grace:)``):
        /// nothing is sent or received, and the streams end when the grace period does.
        case suspended
        /// The connection is gone and its streams ended, or were taken over by a new connection.
        case closed
    }

    public private(set) var state: State = .open

    public init() {}

    /// Stops new streams. False when the connection was not open (already draining, failed or closed): nothing
    /// changes then.
    @discardableResult
    public mutating func drain() -> Bool {
        guard state == .open else { return false }
        state = .draining
        return true
    }

    /// The peer broke the protocol. False when already failed or closed.
    @discardableResult
    public mutating func fail() -> Bool {
        guard state == .open || state == .draining else { return false }
        state = .failed
        return true
    }

    /// The connection is gone and its streams wait to resume. False unless open or draining.
    public mutating func suspend() -> Bool {
        guard state == .open || state == .draining else { return false }
        state = .suspended
        return true
    }

    /// The connection is gone. False when it already was: its streams were ended once, then.
    public mutating func close() -> Bool {
        guard state != .closed else { return false }
        state = .closed
        return true
    }

    /// Frames from the peer are handled (not ignored).
    public var receivesFrames: Bool { state == .open || state == .draining }
    /// A stream may be opened, by either side.
    public var opensStreams: Bool { state == .open }
    /// Failed or closed: nothing new is sent.
    public var isEnding: Bool { state == .failed || state == .closed }
    public var isClosed: Bool { state == .closed }
}
