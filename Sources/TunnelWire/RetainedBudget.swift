import Atomics

/// Bytes that every resumable tunnel of a process keeps, together, to send again after a resume
/// (``TunnelLimits/processRetained``). Each tunnel is bounded by ``TunnelLimits/maxRetained`` too, but a server with
/// thousands of agents that grant large windows and never credit them would otherwise hold that bound thousands of
/// times over. A stream that finds no room stops being resumable, as at the tunnel's own bound. Thread-safe: one
/// relaxed atomic add per DATA frame of a resumable tunnel, no lock.
public final class RetainedBudget: Sendable {
    public let limit: Int
    private let used = ManagedAtomic<Int>(0)

    public init(limit: Int) {
        self.limit = limit
    }

    /// Bytes kept now, over every tunnel.
    public var inUse: Int { used.load(ordering: .relaxed) }

    /// Whether `count` more bytes fit now (a hint: another tunnel may take them first).
    func fits(_ count: Int) -> Bool { used.load(ordering: .relaxed) + count <= limit }

    /// Takes `count` bytes if they fit.
    func take(_ count: Int) -> Bool {
        guard used.wrappingIncrementThenLoad(by: count, ordering: .relaxed) > limit else { return true }
        used.wrappingDecrement(by: count, ordering: .relaxed)
        return false
    }

    func give(_ count: Int) {
        used.wrappingDecrement(by: count, ordering: .relaxed)
    }
}
