import GRPCCore
import Logging
import NIOConcurrencyHelpers
import NIOCore
import TunnelSupport

/// kube-apiserver's egress selector in GRPC mode (`proxyProtocol: GRPC`, `transport.uds`): the
/// konnectivity-compatible `ProxyService/Proxy` on a Unix socket (`--grpc-uds-path`), so that replacing
/// konnectivity-server is a change of binary, not of kube-apiserver's configuration.
///
/// Both ways clients use it are served: older kube-apiservers open one gRPC connection per dial, newer
/// konnectivity clients one connection with an RPC per dial; an RPC may also carry several connectIDs. Each RPC
/// is a ``ProxySession``.
final class GRPCFrontend: ProxyService.SimpleServiceProtocol, @unchecked Sendable {
    /// The caller every dial on the gRPC socket is counted against (`--max-streams-per-caller`): like the
    /// CONNECT Unix socket, it is reachable by its owner only, kube-apiserver on the same machine.
    static let caller = "the gRPC socket"

    let core: TunnelServerCore
    let group: EventLoopGroup
    private let lock = NIOLock()
    private var lastConnectID: Int64 = 0
    private var sessions: [ObjectIdentifier: ProxySession] = [:]
    private var openConnections = 0
    /// The server is stopping: a quiescing connection also reports its RPCs cancelled, but they go on through
    /// the drain, and ``endAll()`` ends them.
    private var stopping = false

    /// One per event loop, taken in turn by the RPCs.
    private let executors: [EventLoopTaskExecutor]
    private var nextExecutor = 0

    init(core: TunnelServerCore, group: EventLoopGroup) {
        self.core = core
        self.group = group
        self.executors = group.makeIterator().map { EventLoopTaskExecutor($0) }
    }

    /// The loop an RPC's tasks run on.
    private func executor() -> EventLoopTaskExecutor {
        lock.withLock {
            nextExecutor = (nextExecutor + 1) % executors.count
            return executors[nextExecutor]
        }
    }

    func proxy(
        request: RPCAsyncSequence<Packet, any Error>, response: RPCWriter<Packet>, context: ServerContext
    ) async throws {
        // On an event loop of the server's (with one loop, the gRPC connection's and the tunnels' own): each
        // message resumes the RPC's tasks without a thread wake-up.
        try await withTaskExecutorPreference(executor()) {
            try await serve(request: request, response: response)
        }
    }

    private func serve(request: RPCAsyncSequence<Packet, any Error>, response: RPCWriter<Packet>) async throws {
        let session = ProxySession(frontend: self)
        let rpcs = lock.withLock {
            sessions[ObjectIdentifier(session)] = session
            return sessions.count
        }
        core.metrics.frontendRPCs.set("grpc", Double(rpcs))
        var inOrder = false
        defer {
            session.end(aborted: !inOrder)
            let rpcs = lock.withLock {
                sessions[ObjectIdentifier(session)] = nil
                return sessions.count
            }
            core.metrics.frontendRPCs.set("grpc", Double(rpcs))
        }
        do {
            // grpc-swift reports a client that went away (a reset stream, a closed connection) through this
            // handler, not by cancelling the task: the reader may wait on a paused stream or for room, and the
            // end wakes it.
            try await withRPCCancellationHandler {
                try await withThrowingDiscardingTaskGroup { group in
                    group.addTask { try await session.writeAll(to: response) }
                    for try await packet in request {
                        try await session.handle(packet)
                    }
                    // The client finished its side: each connectID finishes what it sent, and the RPC ends once
                    // the answers queued before are written.
                    inOrder = true
                    session.end(aborted: false)
                }
            } onCancelRPC: { [self] in
                guard !lock.withLock({ stopping }) else { return }
                session.end(aborted: true)
            }
        } catch let error as RPCError where error.code == .invalidArgument {
            core.logger.warning("gRPC frontend: a Proxy RPC broke the protocol and was ended: \(error.message)")
            throw error
        }
    }

    func nextConnectID() -> Int64 {
        lock.withLock {
            lastConnectID += 1
            return lastConnectID
        }
    }

    func connectionOpened() {
        core.metrics.frontendDials.increment("grpc", "opened")
        let count = lock.withLock {
            openConnections += 1
            return openConnections
        }
        core.metrics.frontendConnections.set("grpc", Double(count))
    }

    func connectionClosed() {
        let count = lock.withLock {
            openConnections -= 1
            return openConnections
        }
        core.metrics.frontendConnections.set("grpc", Double(count))
    }

    func dialEnded(_ result: String) {
        core.metrics.frontendDials.increment("grpc", result)
    }

    /// The server is shutting down (its listener closed already, so no RPC starts after this): every RPC is told
    /// (DRAIN), and goes on through the drain.
    func drain() {
        let all = lock.withLock {
            stopping = true
            return Array(sessions.values)
        }
        for session in all { session.drain() }
    }

    /// Called before the listener closes: from now on a quiescing connection's RPCs are not ended by it.
    func stop() {
        lock.withLock { stopping = true }
    }

    /// Ends every RPC, resetting its connectIDs (the tunnels are closing).
    func endAll() {
        for session in lock.withLock({ Array(sessions.values) }) { session.end(aborted: true) }
    }
}
