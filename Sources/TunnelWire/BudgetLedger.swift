import NIOCore

/// What a stream holds of the budgets, as the budgets count it (``BudgetLedger``). Given back once: a release
/// zeroes it, so a second one gives back nothing.
struct BudgetCharge {
    /// Receive window granted to the peer: the stream's `receive.size` while it is open, 0 once given back.
    var window = 0
    /// Bytes kept to send again after a resume: the stream's `retainedBytes`.
    var retained = 0
    /// Counted in the sums of the connection that holds the stream. False while the stream is handed from a
    /// suspended connection to its successor: then only the process's budgets count it.
    var inConnection = true
}

/// Every budget a tunnel's streams draw on, taken and given back here and nowhere else:
/// - the connection's window budget (``TunnelLimits/connectionWindowBudget``) and the process's
///   (``TunnelLimits/processBudget``): taken by ``openWindow()`` and by a window's growth (``consumed(_:by:promptly:)``),
///   given back by ``releaseWindow(_:)``;
/// - the tunnel's retention bound (``TunnelLimits/maxRetained``) and the process's (``TunnelLimits/processRetained``):
///   taken by ``retain(_:for:)``, given back by ``releaseRetained(_:upTo:)``.
///
/// Each stream carries its ``BudgetCharge``, so a stream that ends, lingers, moves to another connection, or dies
/// with its connection gives back exactly what it took. A stream moving between connections leaves one ledger's sums
/// (``handOut(_:)``) and joins the other's (``takeIn(_:)``); the process's budgets count it throughout.
/// Lives on the tunnel's event loop, like the mux.
struct BudgetLedger {
    let limits: TunnelLimits
    /// Receive window granted by this connection's streams.
    private(set) var windows = 0
    /// Bytes this connection's streams (open and lingering) keep to send again.
    private(set) var retained = 0

    init(limits: TunnelLimits) {
        self.limits = limits
    }

    /// A new stream's window, from the connection's budget and the process's; nil (nothing taken) when the process
    /// budget cannot spare even the minimum. The stream made with it starts charged with it.
    mutating func openWindow() -> ReceiveWindow? {
        let remaining = limits.connectionWindowBudget - windows
        var initial = max(limits.minimumWindow, min(limits.initialWindow, remaining))
        if let budget = limits.processBudget {
            guard let granted = budget.takeWindow(initial, minimum: limits.minimumWindow) else { return nil }
            initial = granted
        }
        windows += initial
        return ReceiveWindow(initial: initial, maximum: limits.maximumWindow)
    }

    /// `count` bytes of `stream` were consumed by its socket: the credit to send, with the window grown if the socket
    /// drains `promptly` and both budgets allow (growth is at most the current size; reserved from the process
    /// budget first and the unused part returned at once).
    mutating func consumed(_ count: Int, by stream: TunnelMux.Stream, promptly: Bool) -> ReceiveWindow.Update? {
        var mayGrow =
            promptly && stream.charge.inConnection && windows + stream.receive.size <= limits.connectionWindowBudget
            && stream.receive.size < stream.receive.maximum
        var reserved = 0
        if mayGrow, let budget = limits.processBudget {
            reserved = budget.takeGrowth(stream.receive.size) ? stream.receive.size : 0
            mayGrow = reserved > 0
        }
        let update = stream.receive.consumed(count, mayGrow: mayGrow)
        if reserved > 0 { limits.processBudget?.giveGrowth(reserved - (update?.growth ?? 0)) }
        if let growth = update?.growth, growth > 0 {
            windows += growth
            stream.charge.window += growth
        }
        return update
    }

    /// Gives back `stream`'s window, to the connection's budget (if it counts the stream) and the process's.
    mutating func releaseWindow(_ stream: TunnelMux.Stream) {
        let window = stream.charge.window
        guard window > 0 else { return }
        stream.charge.window = 0
        if stream.charge.inConnection { windows -= window }
        limits.processBudget?.release(window: window, minimum: limits.minimumWindow)
    }

    /// Whether `count` more retained bytes fit the tunnel's and (as a hint) the process's bound now.
    func retainFits(_ count: Int) -> Bool {
        retained + count <= limits.maxRetained && (limits.processRetained?.fits(count) ?? true)
    }

    /// Keeps `slice` for `stream` to send again, if the tunnel's and the process's bounds allow; false: nothing kept.
    mutating func retain(_ slice: ByteBuffer, for stream: TunnelMux.Stream) -> Bool {
        let count = slice.readableBytes
        guard retained + count <= limits.maxRetained, limits.processRetained?.take(count) ?? true else {
            return false
        }
        retained += count
        stream.charge.retained += count
        stream.retain(slice)
        return true
    }

    /// Lets go of what `stream` keeps below `offset` (the peer has it), or of all of it (`nil`: the stream ends or
    /// gives up being resumable).
    mutating func releaseRetained(_ stream: TunnelMux.Stream, upTo offset: UInt64? = nil) {
        if let offset {
            stream.trimRetained(upTo: offset)
        } else {
            stream.retained = nil
            stream.retainedFrom = stream.sent
            stream.retainedBytes = 0
        }
        let released = stream.charge.retained - stream.retainedBytes
        guard released > 0 else { return }
        stream.charge.retained = stream.retainedBytes
        if stream.charge.inConnection { retained -= released }
        limits.processRetained?.give(released)
    }

    /// Gives back all `stream` holds.
    mutating func release(_ stream: TunnelMux.Stream) {
        releaseWindow(stream)
        releaseRetained(stream)
    }

    /// `streams` leave this connection for its successor, still holding what they took: the process's budgets go on
    /// counting them, this connection's sums no longer do.
    mutating func handOut(_ streams: [TunnelMux.Stream]) {
        for stream in streams where stream.charge.inConnection {
            stream.charge.inConnection = false
            windows -= stream.charge.window
            retained -= stream.charge.retained
        }
    }

    /// A stream handed out by a suspended connection joins this one's sums.
    mutating func takeIn(_ stream: TunnelMux.Stream) {
        guard !stream.charge.inConnection else { return }
        stream.charge.inConnection = true
        windows += stream.charge.window
        retained += stream.charge.retained
    }
}
