import NIOCore

/// Where a resumable tunnel is in moving its streams between connections, as one value: which phase, and only the
/// data that phase has (the timer that ends it, the streams frozen in it, the resets that wait in it, the mux it
/// hands to). Every change is a named transition that says what the mux must undo (the timer of the phase left).
/// TunnelMux+Resume.swift drives it; it lives on the tunnel's event loop, like the mux.
///
///     live ──suspend──▶ suspended ──handOver──▶ handedOver
///       │                  ▲
///       ├─beginTakeOver─▶ takingOver ──adopt──▶ frozen ──reconcile──▶ live      (server)
///       └─expect────────▶ expecting ──(the server's RESUME: adopt, reconcile)──▶ live   (agent)
///     frozen, takingOver, expecting ──suspend──▶ suspended;   any ──end──▶ live (the connection closed)
///
/// Whether the tunnel resumes at all (`TunnelMux.resumable`, agreed at registration) and whether this connection
/// is being closed on purpose (`resumeRefused`) are its configuration, not its phase.
struct ResumeMachine {
    enum Phase {
        /// Nothing is being resumed.
        case live
        /// Server side: a suspended tunnel of the same agent is being taken over; no stream opens until its ids
        /// are known.
        case takingOver
        /// Agent side: the server's RESUME, when it comes, resumes the streams of `from`, the suspended tunnel this
        /// connection replaces (nil: nothing waits there any more, and the RESUME is answered with none).
        case expecting(from: TunnelMux?)
        /// Streams taken over and frozen (sockets unread, nothing sent) until the peer's RESUME; `answerDue`: this
        /// side's RESUME went out and the peer's answer is due (server side); `timer` gives up on it.
        case frozen(Set<UInt32>, answerDue: Bool, timer: Scheduled<Void>?)
        /// The connection is gone; the streams wait for a new one until `timer`. `resets`: streams given up
        /// meanwhile, whose RST goes out on the connection that resumes.
        case suspended(timer: Scheduled<Void>?, resets: [UInt32])
        /// Another connection took the streams over: their sockets' events are passed on to `to`.
        case handedOver(to: TunnelMux)
    }

    private(set) var phase = Phase.live

    // MARK: Reading

    var successor: TunnelMux? {
        if case .handedOver(let successor) = phase { return successor }
        return nil
    }

    var isTakingOver: Bool {
        if case .takingOver = phase { return true }
        return false
    }

    /// The stream was taken over and waits for the peer's RESUME. Free when nothing is frozen (the usual case):
    /// it is asked for every frame a stream would send.
    func isFrozen(_ id: UInt32) -> Bool {
        guard case .frozen(let ids, _, _) = phase else { return false }
        return ids.contains(id)
    }

    var hasFrozen: Bool {
        guard case .frozen(let ids, _, _) = phase else { return false }
        return !ids.isEmpty
    }

    // MARK: Transitions

    /// Server side, before the agent is routable.
    mutating func beginTakeOver() {
        if case .live = phase { phase = .takingOver }
    }

    /// Agent side: the server's RESUME will resume `old`'s streams here.
    mutating func expect(from old: TunnelMux?) {
        phase = .expecting(from: old)
    }

    /// Agent side, at the server's RESUME: the tunnel it resumes (`.some(nil)`: none waits any more), or nil when no
    /// RESUME was expected. Leaves `expecting`.
    mutating func takeExpected() -> TunnelMux?? {
        guard case .expecting(let old) = phase else { return nil }
        phase = .live
        return .some(old)
    }

    /// The connection is gone and the streams wait. Returns the timer of the phase left, to cancel.
    mutating func suspend() -> Scheduled<Void>? {
        let left = timer
        phase = .suspended(timer: nil, resets: [])
        return left
    }

    /// The timer that ends the current phase (suspended or frozen); ignored in any other.
    mutating func setTimer(_ timer: Scheduled<Void>?) {
        switch phase {
        case .suspended(_, let resets): phase = .suspended(timer: timer, resets: resets)
        case .frozen(let ids, let answerDue, _): phase = .frozen(ids, answerDue: answerDue, timer: timer)
        default: break
        }
    }

    /// A stream given up while suspended: its RST waits for the connection that resumes. False (nothing kept)
    /// when not suspended: the RST goes out now.
    mutating func noteReset(_ id: UInt32) -> Bool {
        guard case .suspended(let timer, var resets) = phase else { return false }
        phase = .live  // the array is uniquely referenced while it grows
        resets.append(id)
        phase = .suspended(timer: timer, resets: resets)
        return true
    }

    /// Suspended → handed over to `successor`: the RSTs that waited, and the grace timer to cancel. Nil when not
    /// suspended.
    mutating func handOver(to successor: TunnelMux) -> (resets: [UInt32], timer: Scheduled<Void>?)? {
        guard case .suspended(let timer, let resets) = phase else { return nil }
        phase = .handedOver(to: successor)
        return (resets, timer)
    }

    /// The handed-over streams `ids` are taken in and frozen; `answerDue`: this side's RESUME went out (server).
    /// Leaves `takingOver`. Returns the timer of the phase left, to cancel.
    mutating func adopt(frozen ids: Set<UInt32>, answerDue: Bool) -> Scheduled<Void>? {
        let left = timer
        phase = ids.isEmpty && !answerDue ? .live : .frozen(ids, answerDue: answerDue, timer: nil)
        return left
    }

    /// Server side, at the peer's RESUME: whether its answer was due (then the frozen streams are reconciled).
    var answerDue: Bool {
        guard case .frozen(_, let due, _) = phase else { return false }
        return due
    }

    /// Both lists are known (or the peer never answered): the frozen streams, and the timer to cancel. → live.
    mutating func thaw() -> (ids: Set<UInt32>, timer: Scheduled<Void>?) {
        guard case .frozen(let ids, _, let timer) = phase else { return ([], nil) }
        phase = .live
        return (ids, timer)
    }

    /// The connection closed and its streams ended: nothing waits any more. Returns the timer to cancel. A tunnel
    /// handed over stays so (its sockets' events still go to the successor).
    mutating func end() -> Scheduled<Void>? {
        if case .handedOver = phase { return nil }
        let left = timer
        phase = .live
        return left
    }

    private var timer: Scheduled<Void>? {
        switch phase {
        case .suspended(let timer, _), .frozen(_, _, let timer): return timer
        default: return nil
        }
    }
}
