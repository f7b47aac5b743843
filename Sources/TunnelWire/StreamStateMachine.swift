/// The life of one stream, checked against every frame that concerns it: HTTP/2's stream states (RFC 9113
/// §5.1) reduced to what the EdgeTunnel protocol has. A value type with no I/O, so that tests can drive it frame
/// by frame; ``TunnelMux`` owns one per stream.
///
///     opening ──OPEN_OK──► open ──FIN sent──► halfClosedLocal ──FIN received──► closed
///        │                  └───FIN received──► halfClosedRemote ──FIN sent──┘
///        └──OPEN_FAIL / RST (either way, from any state) ──────────────────────► closed
///
/// `opening`: the server has sent OPEN and waits for the answer, or the agent has received OPEN and is dialling.
/// A frame the state does not allow is a protocol error with a reason; the connection is closed, the process
/// goes on.
public struct StreamStateMachine: Sendable, Equatable {
    public enum State: Sendable, Equatable {
        case opening
        case open
        /// We sent FIN; the peer may still send.
        case halfClosedLocal
        /// The peer sent FIN; we may still send.
        case halfClosedRemote
        case closed
    }

    /// Which side sent the OPEN.
    public enum Opener: Sendable, Equatable {
        case local
        case remote
    }

    /// A received frame the state allows; reset streams are `closed` and forgotten by the mux, so frames that
    /// cross a reset never reach here.
    public enum Received: Sendable, Equatable {
        case data
        case window
        case fin
        case rst
        case openOK
        case openFail
    }

    public private(set) var state = State.opening
    public let opener: Opener

    public init(openedBy opener: Opener) {
        self.opener = opener
    }

    /// Applies a frame from the peer, or throws the protocol error it is in this state.
    public mutating func receive(_ frame: Received) throws {
        switch (frame, state) {
        case (.rst, _):
            state = .closed
        case (.openOK, .opening) where opener == .local:
            state = .open
        case (.openFail, .opening) where opener == .local:
            state = .closed
        case (.data, .open), (.data, .halfClosedLocal), (.window, .open), (.window, .halfClosedRemote),
            (.window, .halfClosedLocal):
            break
        case (.fin, .open):
            state = .halfClosedRemote
        case (.fin, .halfClosedLocal):
            state = .closed
        default:
            throw FrameError("\(Self.name(frame)) on a stream that is \(Self.describe(state, opener))")
        }
    }

    /// The agent answered OPEN_OK: the stream is open both ways. False if the stream is not opening here.
    public mutating func sendOpenOK() -> Bool {
        guard state == .opening, opener == .remote else { return false }
        state = .open
        return true
    }

    /// We send FIN: no more bytes from us. False when this side may not send (or already sent FIN).
    public mutating func sendFin() -> Bool {
        switch state {
        case .open: state = .halfClosedLocal
        case .halfClosedRemote: state = .closed
        default: return false
        }
        return true
    }

    /// We send RST, or the stream is given up for another reason.
    public mutating func reset() {
        state = .closed
    }

    /// Whether we may send DATA or FIN.
    public var canSend: Bool { state == .open || state == .halfClosedRemote }

    public var isClosed: Bool { state == .closed }

    private static func name(_ frame: Received) -> String {
        switch frame {
        case .data: "DATA"
        case .window: "WINDOW"
        case .fin: "FIN"
        case .rst: "RST"
        case .openOK: "OPEN_OK"
        case .openFail: "OPEN_FAIL"
        }
    }

    private static func describe(_ state: State, _ opener: Opener) -> String {
        switch state {
        case .opening: opener == .local ? "still opening (no OPEN_OK yet)" : "still being opened by this side"
        case .open: "open"
        case .halfClosedLocal: "half-closed by this side"
        case .halfClosedRemote: "already finished by the peer (FIN)"
        case .closed: "closed"
        }
    }
}
