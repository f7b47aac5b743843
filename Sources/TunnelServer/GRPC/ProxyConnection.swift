import Foundation
import NIOConcurrencyHelpers
import NIOCore
@preconcurrency import TunnelWire

/// One connectID of a Proxy RPC: a tunnel stream whose caller is a series of DATA packets on a gRPC stream
/// rather than a socket. The ``StreamEndpoint`` that the gRPC frontend attaches to the stream, as the other
/// frontends attach a ``StreamGlue``.
///
/// Flow control carries over: bytes from the tunnel are credited back only once the packet that carries them was
/// written to the gRPC stream (which waits while HTTP/2 flow control holds it), and a DATA packet for a stream
/// the tunnel has paused is not handed over until it resumes (the RPC's reader waits for it; other packets of the
/// RPC before it are handled). So one connectID whose reader is slow holds one stream window and at most two
/// packets beyond it, and other RPCs keep going.
///
/// Thread-safe: the mux calls it from the tunnel's event loop, the RPC's tasks from theirs. The session is held
/// strongly: the mux may still deliver to a connectID while its RPC ends, and the session lets go of its
/// connections when it ends.
final class ProxyConnection: StreamEndpoint, @unchecked Sendable {
    let connectID: Int64
    let streamID: UInt32
    private let session: ProxySession
    /// Completed when the connectID ends, however it ends: the mux then lets go of the stream if it still has it
    /// (``TunnelMux/openStream(target:until:)``), and the caller's stream count is given back.
    let ended: EventLoopPromise<Void>

    private let lock = NIOLock()
    private var mux: TunnelMux
    private var paused = false
    private var state = State.open
    private var resume: CheckedContinuation<Void, Never>?

    private enum State {
        case open
        /// The client closed the connectID: what it sent goes out, then FIN, and the target's last bytes are
        /// taken and dropped, until the target closes too or the grace passed (then the stream is reset).
        case closing(Scheduled<Void>?)
        case ended
    }

    /// How long a connectID the client closed waits for its target to close, once everything the client sent
    /// has gone to the agent, before it is reset: konnectivity closes the target's connection at once, which may
    /// drop the client's last bytes; a reset after the target had that long to read them does not.
    static let closeGrace: TimeAmount = .seconds(5)
    /// The longest a closed connectID's bytes may wait for credit before the stream is reset anyway.
    static let closeLimit: TimeAmount = .seconds(60)

    init(connectID: Int64, streamID: UInt32, mux: TunnelMux, session: ProxySession, ended: EventLoopPromise<Void>) {
        self.connectID = connectID
        self.streamID = streamID
        self.mux = mux
        self.session = session
        self.ended = ended
    }

    // MARK: From the client

    /// Hands the bytes of one DATA packet to the stream. If the tunnel paused the stream (out of credit, the tunnel
    /// full), waits first until it resumes or the connectID ends: two packets at most wait beyond the window.
    func send(_ bytes: Data) async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let wait = lock.withLock {
                    guard paused, case .open = state, !Task.isCancelled else { return false }
                    resume = continuation
                    return true
                }
                if !wait { continuation.resume() }
            }
        } onCancel: {
            self.wake()
        }
        let (open, mux): (Bool, TunnelMux) = lock.withLock {
            if case .open = state { return (true, self.mux) }
            return (false, self.mux)
        }
        guard open else { return }
        // Not waited for: a pause it leads to may reach this connection after the next packet was handed over, so
        // at most two packets wait beyond the window.
        mux.dataFromSocket(streamID, ByteBuffer(bytes: bytes))
    }

    /// CLOSE_REQ, or the client ended its side of the RPC in order: what it sent still goes out, then FIN; the
    /// stream ends when the target closes too, or is reset after the grace.
    func closeFromClient() {
        let mux: TunnelMux? = lock.withLock {
            guard case .open = state else { return nil }
            state = .closing(nil)
            return self.mux
        }
        guard let mux else { return }
        wake()
        mux.socketInputClosed(streamID)
        scheduleCloseCheck(on: mux, after: Self.closeGrace, until: .now() + Self.closeLimit)
    }

    /// After the grace: reset, unless the client's bytes still wait for credit (then later, up to the limit).
    private func scheduleCloseCheck(on mux: TunnelMux, after delay: TimeAmount, until limit: NIODeadline) {
        let id = streamID
        let timer = mux.eventLoop.scheduleTask(in: delay) { [self] in
            mux.holdsUnsent(id).whenSuccess { [self] unsent in
                if unsent && NIODeadline.now() < limit {
                    scheduleCloseCheck(on: mux, after: Self.closeGrace, until: limit)
                    return
                }
                guard finish().mux != nil else { return }
                mux.socketClosed(id, eof: false)
                ended.succeed(())
            }
        }
        let late: Bool = lock.withLock {
            guard case .closing = state else { return true }
            state = .closing(timer)
            return false
        }
        if late { timer.cancel() }
    }

    /// The RPC failed or was cancelled: the stream is reset.
    func abort() {
        guard let mux = finish().mux else { return }
        wake()
        mux.socketClosed(streamID, eof: false)
        ended.succeed(())
    }

    /// `count` bytes of this connectID were written to the gRPC stream: the tunnel may send as many again.
    func written(_ count: Int, promptly: Bool) {
        lock.withLock { mux }.consumedBySocket(streamID, count: count, promptly: promptly)
    }

    // MARK: StreamEndpoint (from the mux's loop)

    func moveToTunnel(_ mux: TunnelMux) {
        lock.withLock { self.mux = mux }
    }

    func deliverFromTunnel(_ buffers: [ByteBuffer]) {
        var count = 0
        for buffer in buffers { count += buffer.readableBytes }
        // Queued under the lock that a close takes: no DATA follows the connectID's CLOSE_RSP.
        let dropped: TunnelMux? = lock.withLock {
            guard case .open = state else { return mux }
            var bytes = Data()
            bytes.reserveCapacity(count)
            // Copied: nothing here pins the tunnel's read buffer, however long the client takes.
            for buffer in buffers { bytes.append(contentsOf: buffer.readableBytesView) }
            var packet = Packet()
            packet.type = .data
            packet.data.connectID = connectID
            packet.data.data = bytes
            session.outbox.push(.data(packet, connection: self, count: count))
            return nil
        }
        // Closed by the client: the target's last bytes have nobody to go to; taken, so that it can finish.
        dropped?.consumedBySocket(streamID, count: count, promptly: false)
    }

    func setPausedFromTunnel(_ paused: Bool) {
        let waiting: CheckedContinuation<Void, Never>? = lock.withLock {
            self.paused = paused
            guard !paused else { return nil }
            defer { resume = nil }
            return resume
        }
        waiting?.resume()
    }

    /// The target closed its side: konnectivity's protocol has no half-close, so the connectID ends (CLOSE_RSP
    /// after its last DATA, unless the client closed it first) and the stream is finished from this side too.
    func finishOutputFromTunnel() {
        let (wasOpen, mux) = finish()
        guard let mux else { return }
        wake()
        // Not from inside the mux's handling of the FIN but on its loop after it, and before the end of the
        // connectID reaches the mux (which would reset a stream that still has this endpoint). A connectID the
        // client closed may still hold its last bytes: they go out, then its FIN.
        mux.eventLoop.execute {
            mux.socketClosed(self.streamID, eof: true)
            self.ended.succeed(())
        }
        if wasOpen { session.closed(self, error: nil) }
    }

    func resetFromTunnel() {
        let (wasOpen, mux) = finish()
        guard mux != nil else { return }
        wake()
        ended.succeed(())
        if wasOpen { session.closed(self, error: "the connection to the target failed or was reset") }
    }

    // MARK: Ending

    /// Moves to `.ended` (cancelling a close's timer): the mux, or nil if it had ended already, and whether the
    /// connectID was still open for its client (not closed by it first).
    private func finish() -> (wasOpen: Bool, mux: TunnelMux?) {
        let (wasOpen, mux, timer): (Bool, TunnelMux?, Scheduled<Void>?) = lock.withLock {
            switch state {
            case .ended: return (false, nil, nil)
            case .open:
                state = .ended
                return (true, self.mux, nil)
            case .closing(let timer):
                state = .ended
                return (false, self.mux, timer)
            }
        }
        timer?.cancel()
        return (wasOpen, mux)
    }

    private func wake() {
        let waiting: CheckedContinuation<Void, Never>? = lock.withLock {
            defer { resume = nil }
            return resume
        }
        waiting?.resume()
    }
}
