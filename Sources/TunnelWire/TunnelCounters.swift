import Atomics

/// Byte counters of one tunnel connection: written on the connection's event loop for every DATA frame, read
/// from any thread (metrics, the agent list). Relaxed atomics: a reader may see bytes in before the matching
/// bytes out, never a torn or lost count, and the hot path takes no lock.
public final class TunnelCounters: Sendable {
    private let bytesIn = ManagedAtomic<Int>(0)
    private let bytesOut = ManagedAtomic<Int>(0)
    private let streams = ManagedAtomic<Int>(0)
    private let pacedNow = ManagedAtomic<Bool>(false)
    public init() {}
    func setPaced(_ on: Bool) { pacedNow.store(on, ordering: .relaxed) }
    /// Whether the tunnel is paced now: it sends on a link slower than ``TunnelLimits/pacedBelowBytesPerSecond``
    /// and keeps its queues short (interactive streams ahead of bulk), at the cost of larger frames' throughput.
    public var paced: Bool { pacedNow.load(ordering: .relaxed) }
    func add(in count: Int) { bytesIn.wrappingIncrement(by: count, ordering: .relaxed) }
    func add(out count: Int) { bytesOut.wrappingIncrement(by: count, ordering: .relaxed) }
    func setStreams(_ count: Int) { streams.store(count, ordering: .relaxed) }
    /// (bytes received from the peer, bytes sent to it, open streams).
    public var snapshot: (bytesIn: Int, bytesOut: Int, streams: Int) {
        (bytesIn.load(ordering: .relaxed), bytesOut.load(ordering: .relaxed), streams.load(ordering: .relaxed))
    }
}
