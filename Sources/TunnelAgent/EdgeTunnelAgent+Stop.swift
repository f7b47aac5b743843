import NIOCore
import TunnelWire

/// The end of tunnels and of the agent: a replaced tunnel retired once its streams end, and the agent's drain.
extension EdgeTunnelAgent {
    /// A replaced tunnel: no new streams come on it (the server drains it); close it once its streams end,
    /// however long they run (its keepalive still closes it if the path dies).
    func retireTunnel(_ tunnel: AgentTunnel) {
        lock.withLock { lingering.append(tunnel) }
        tunnel.mux.whenIdle().whenComplete { [weak self] _ in
            // Closed on purpose, and the server is told first (GOAWAY): neither side waits to resume a stream that
            // just ended on it.
            tunnel.mux.closeWithoutResume()
            tunnel.mux.drain(reason: "the agent retired this tunnel")
            tunnel.channel?.close(promise: nil)
            self?.retire(tunnel)
        }
    }

    /// Drains: tells the server to send no new streams, lets open streams finish for up to the drain timeout,
    /// then closes the tunnel and the meta port.
    public func stop() async {
        let (tunnel, meta, old, waiters, failover) = lock.withLock {
            () -> (AgentTunnel?, Channel?, [AgentTunnel], [EventLoopPromise<Bool>], Task<Void, Never>?) in
            stopping = true
            defer { connectedWaiters = [] }
            return (current, metaChannel, lingering, connectedWaiters, failoverTask)
        }
        for waiter in waiters { waiter.succeed(false) }
        for replaced in old {
            replaced.mux.closeWithoutResume()
            replaced.channel?.close(promise: nil)
        }
        failover?.cancel()  // ends its backoff sleep or its wait on the tunnel at once
        let all = (tunnel.map { [$0] } ?? []) + replicas.takeAll()
        for tunnel in all {
            tunnel.mux.closeWithoutResume()  // what outlives the drain ends with the agent
            tunnel.mux.drain(reason: "agent shutting down")
        }
        let waiting = lock.withLock { () -> [TunnelMux] in
            defer { suspended = [:] }
            return suspended.values.map(\.mux)
        }
        for mux in waiting { mux.abandonSuspended() }
        for tunnel in all {
            await tunnel.mux.whenIdle().orTimeout(configuration.drainTimeout)
            try? await tunnel.channel?.close()
        }
        try? await meta?.close()
    }

    /// After ``stop()`` and once ``run()`` has returned: waits for a dial still under way, then shuts down the
    /// event loops the agent made itself (a loop shut down under a connection attempt would leak its promises).
    public func shutdown() async {
        await replicas.finishDials()
        if ownsGroup { try? await group.shutdownGracefully() }
    }

    func retire(_ tunnel: AgentTunnel) {
        let counters = tunnel.mux.counters.snapshot
        let wasCurrent = lock.withLock { () -> Bool in
            guard !tunnel.retired else { return false }
            tunnel.retired = true
            retiredBytes.bytesIn += counters.bytesIn
            retiredBytes.bytesOut += counters.bytesOut
            lingering.removeAll { $0 === tunnel }
            guard current === tunnel else { return false }
            current = nil
            activeAddress = nil
            return true
        }
        if wasCurrent {
            metrics.connected.set(Int64(0))
            metrics.setActive(nil)
        }
    }
}
