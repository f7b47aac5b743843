import GRPCCore
import Logging
import NIOConcurrencyHelpers
import NIOCore
import TunnelSupport
import TunnelWire

/// One Proxy RPC of the gRPC frontend: the client's packets in, the server's out, and the connectIDs between.
///
/// The protocol (konnectivity's, issue 28): DIAL_REQ(random, "tcp", host:port) is answered by DIAL_RSP(random)
/// with a connectID or a one-line error; DATA flows both ways for the connectID; CLOSE_REQ is answered by
/// CLOSE_RSP, and a target that closes sends CLOSE_RSP too; DIAL_CLS(random) cancels a dial still pending.
/// A dial goes through ``StreamDialer`` like a CONNECT: the same routing by node name or IP, the agents' allow
/// lists, the per-caller and per-agent limits, the same failures.
///
/// A packet that breaks the protocol (an unknown type, a type the server sends, a type without its payload) ends
/// this RPC with INVALID_ARGUMENT and a one-line message; its connectIDs are reset, and other RPCs go on. A
/// packet naming a connectID or random that is not this RPC's is refused on its own (CLOSE_RSP or DIAL_RSP with
/// an error), since a client racing a close sends those in good faith.
///
/// Thread-safe: the reading task, the writing task and the tunnels' loops all call in.
final class ProxySession: @unchecked Sendable {
    let outbox = ProxyOutbox()
    private let frontend: GRPCFrontend

    private let lock = NIOLock()
    private var connections: [Int64: ProxyConnection] = [:]
    /// The random of each open connectID: a DIAL_REQ may not reuse one.
    private var randoms: [Int64: Int64] = [:]
    private var dials: [Int64: PendingDial] = [:]
    private var ended = false
    /// The client sent DRAIN: it opens no new connections here (as a draining konnectivity agent takes none).
    private var draining = false

    /// A dial waiting for its agent's answer. `cancelled` is read and written under the session's lock.
    final class PendingDial {
        let ended: EventLoopPromise<Void>
        var cancelled = false
        init(ended: EventLoopPromise<Void>) { self.ended = ended }
    }

    init(frontend: GRPCFrontend) {
        self.frontend = frontend
    }

    private var core: TunnelServerCore { frontend.core }

    // MARK: The client's packets

    func handle(_ packet: Packet) async throws {
        switch packet.type {
        case .dialReq:
            guard case .dialRequest(let request)? = packet.payload else {
                throw invalid("DIAL_REQ without a dialRequest")
            }
            dial(request)
        case .data:
            guard case .data(let data)? = packet.payload else { throw invalid("DATA without data") }
            guard let connection = lock.withLock({ connections[data.connectID] }) else {
                answerClose(data.connectID, error: "connectID \(data.connectID) is not open on this stream")
                break
            }
            if !data.data.isEmpty { await connection.send(data.data) }
        case .closeReq:
            guard case .closeRequest(let request)? = packet.payload else {
                throw invalid("CLOSE_REQ without a closeRequest")
            }
            let id = request.connectID
            guard let connection = take(id) else {
                answerClose(id, error: "connectID \(id) is not open on this stream")
                break
            }
            connection.closeFromClient()
            answerClose(id, error: nil)
        case .dialCls:
            guard case .closeDial(let request)? = packet.payload else { throw invalid("DIAL_CLS without a closeDial") }
            let pending: PendingDial? = lock.withLock {
                guard let pending = dials[request.random] else { return nil }
                pending.cancelled = true
                return pending
            }
            pending?.ended.succeed(())  // the mux cancels the open: RST to the agent, a late OPEN_OK is reset
        case .drain:
            lock.withLock { draining = true }
            core.logger.info("a gRPC client sent DRAIN: its open connections go on, it gets no new ones")
        case .dialRsp:
            throw invalid("DIAL_RSP is sent by the server, not to it")
        case .closeRsp:
            throw invalid("CLOSE_RSP is sent by the server, not to it")
        case .UNRECOGNIZED(let type):
            throw invalid("unknown packet type \(type)")
        }
        await outbox.waitForRoom()
    }

    private func invalid(_ message: String) -> RPCError {
        RPCError(code: .invalidArgument, message: message)
    }

    // MARK: Dialling

    private func dial(_ request: DialRequest) {
        let random = request.random
        guard request.protocol == "tcp" else {
            return refuse(random, "protocol \"\(PeerText.bounded(request.protocol))\" is not supported: only tcp")
        }
        guard let target = HostPort(authority: request.address) else {
            return refuse(random, "address \"\(PeerText.bounded(request.address))\" is not host:port")
        }
        let loop = frontend.group.next()
        let pending = PendingDial(ended: loop.makePromise(of: Void.self))
        let refusal: String? = lock.withLock {
            if ended { return "the stream has ended" }
            if draining { return "this stream sent DRAIN: it opens no new connections" }
            if dials[random] != nil || randoms.values.contains(random) {
                return "random \(random) is already in use on this stream"
            }
            dials[random] = pending
            return nil
        }
        if let refusal {
            pending.ended.succeed(())  // nothing waits on it; NIO traps on a promise never completed
            return refuse(random, refusal)
        }
        let caller = GRPCFrontend.caller
        guard core.callerStreams.admit(caller, until: pending.ended.futureResult) else {
            lock.withLock { _ = dials.removeValue(forKey: random) }
            pending.ended.succeed(())
            core.metrics.limitHits.increment("streams_per_caller")
            return refuse(random, "caller \(caller) has \(core.callerStreams.limit) streams open, its limit")
        }
        StreamDialer.open(
            target, server: core, on: loop, until: pending.ended.futureResult,
            callerActive: { [self] in lock.withLock { !pending.cancelled && !ended } },
            describe: { _, failure in failure.reason }
        ).whenSuccess { outcome in
            self.dialed(random, pending, outcome)
        }
    }

    private func dialed(_ random: Int64, _ pending: PendingDial, _ outcome: StreamDialer.Outcome) {
        switch outcome {
        case .opened(let mux, let streamID, _):
            let connectID = frontend.nextConnectID()
            let connection = ProxyConnection(
                connectID: connectID, streamID: streamID, mux: mux, session: self, ended: pending.ended)
            let live: Bool = lock.withLock {
                dials[random] = nil
                guard !pending.cancelled, !ended else { return false }
                connections[connectID] = connection
                randoms[connectID] = random
                return true
            }
            guard live else {
                mux.cancelStream(streamID)
                pending.ended.succeed(())
                frontend.dialEnded("cancelled")
                return
            }
            frontend.connectionOpened()
            var packet = Packet()
            packet.type = .dialRsp
            packet.dialResponse.random = random
            packet.dialResponse.connectID = connectID
            outbox.push(.answer(packet))  // before the first DATA: the attach delivers what the target sent
            mux.attach(connection, to: streamID)
        case .failed(let status, let message):
            let cancelled: Bool = lock.withLock {
                dials[random] = nil
                return pending.cancelled || ended
            }
            pending.ended.succeed(())
            if cancelled && status == OpenFail.callerGoneCode {
                frontend.dialEnded("cancelled")
            } else {
                refuse(random, message)
            }
        }
    }

    private func refuse(_ random: Int64, _ message: String) {
        frontend.dialEnded("failed")
        var packet = Packet()
        packet.type = .dialRsp
        packet.dialResponse.random = random
        packet.dialResponse.error = message
        outbox.push(.answer(packet))
    }

    // MARK: Closing

    /// The connectID's stream ended from the tunnel's side (the target closed, or the stream was reset).
    func closed(_ connection: ProxyConnection, error: String?) {
        guard take(connection.connectID) != nil else { return }
        answerClose(connection.connectID, error: error)
    }

    private func take(_ connectID: Int64) -> ProxyConnection? {
        let connection: ProxyConnection? = lock.withLock {
            randoms[connectID] = nil
            return connections.removeValue(forKey: connectID)
        }
        if connection != nil { frontend.connectionClosed() }
        return connection
    }

    private func answerClose(_ connectID: Int64, error: String?) {
        var packet = Packet()
        packet.type = .closeRsp
        packet.closeResponse.connectID = connectID
        if let error { packet.closeResponse.error = error }
        outbox.push(.answer(packet))
    }

    /// The RPC ends: in order (`aborted` false: the client finished its side, and each connectID finishes what its
    /// client sent) or not (each is reset). Pending dials are cancelled. Idempotent.
    func end(aborted: Bool) {
        let (open, pending): ([ProxyConnection], [PendingDial]) = lock.withLock {
            guard !ended else { return ([], []) }
            ended = true
            let taken = (Array(connections.values), Array(dials.values))
            for dial in dials.values { dial.cancelled = true }
            connections = [:]
            randoms = [:]
            dials = [:]
            return taken
        }
        for connection in open {
            frontend.connectionClosed()
            if aborted { connection.abort() } else { connection.closeFromClient() }
        }
        for dial in pending { dial.ended.succeed(()) }
        outbox.finish()
    }

    /// The server is shutting down: tells the client, as a konnectivity agent tells its server before it goes.
    func drain() {
        var packet = Packet()
        packet.type = .drain
        packet.drain = Drain()
        outbox.push(.answer(packet))
    }

    // MARK: The server's packets

    func writeAll(to response: RPCWriter<Packet>) async throws {
        do {
            while let item = await outbox.next() {
                switch item {
                case .answer(let packet):
                    try await response.write(packet)
                case .data(let packet, let connection, let count):
                    try await response.write(packet)
                    // A client that keeps up finds nothing more queued behind this packet: its stream's window may
                    // grow. One that is behind does not earn a larger window.
                    connection.written(count, promptly: outbox.isEmpty)
                }
            }
        } catch {
            end(aborted: true)  // the client is gone: the reader may be waiting for room or for a paused stream
            throw error
        }
    }
}
