import NIOConcurrencyHelpers
import NIOCore

extension TunnelMux {
    /// One stream of the tunnel: its windows, what waits to be sent or delivered, and where it is in its life.
    /// Lives on the tunnel channel's event loop, like the mux.
    final class Stream {
        let id: UInt32
        var glue: (any StreamEndpoint)?
        var send: SendWindow
        var receive: ReceiveWindow
        /// Socket bytes not sent yet: waiting for credit, or for their turn on the tunnel (at most one read's
        /// worth: the socket is not read while they wait).
        var pending: ByteBuffer?
        /// In the mux's `sendQueue`: it has pending bytes and credit, and waits for the tunnel to take them.
        var queuedToSend = false
        /// The socket's input ended while bytes were still pending: FIN follows the last of them.
        var finAfterPending = false
        /// DATA received and not yet handed to the glue: gathered during one read of the tunnel and handed over
        /// in one go at its end (one hop, one flush), or held until the glue is attached.
        var inbound: [ByteBuffer] = []
        /// Listed in `toDeliver` for the end of the current read.
        var deliveryQueued = false
        /// What the glue was last told: reading from its socket is paused.
        var readPaused = false
        /// Where the stream is in its life; every frame from the peer is checked against it.
        var lifecycle: StreamStateMachine
        /// Server side, while `lifecycle` is opening: who learns the agent's answer, and the timer that gives
        /// up on it (cancelled with the answer, so ten thousand open streams leave no timers behind).
        var openPromise: EventLoopPromise<OpenResult>?
        var openTimer: Scheduled<Void>?
        /// Server side, for a stream tied to its caller (``TunnelMux/openStream(target:until:)``): which mux holds
        /// the stream now, updated when it is resumed elsewhere. Weak, so that the caller's close does not keep a
        /// chain of old tunnels alive for as long as the stream lasts.
        var owner: Owner?

        // Byte accounting, for resuming (``TunnelMux/enableResume(grace:)``); offsets count from OPEN.
        /// DATA bytes received from the peer.
        var received: UInt64 = 0
        /// Of those, bytes this side consumed and credited back (WINDOWs without the growth flag).
        var credited: UInt64 = 0
        /// Resumable tunnels only: DATA sent and not yet credited by the peer as consumed, kept to be sent again
        /// after a resume. The slices themselves where they fill most of their buffer, small ones gathered
        /// (``KeptBytes``); at most the peer's receive window.
        /// Made at the first DATA of a resumable tunnel: a stream of any other tunnel allocates nothing for it.
        var retained: CircularBuffer<ByteBuffer>?
        /// The offset of the first retained byte, and how many bytes are retained.
        var retainedFrom: UInt64 = 0
        var retainedBytes = 0
        /// Bytes the peer has credited as consumed.
        var peerCredited: UInt64 = 0
        /// Kept nothing to send again (the tunnel's bound was reached): reset, not suspended, when the connection goes.
        var unresumable = false
        /// DATA bytes sent (resumable tunnels).
        var sent: UInt64 { retainedFrom + UInt64(retainedBytes) }
        /// What the stream holds of the budgets; taken and given back only by the ``BudgetLedger``.
        var charge: BudgetCharge

        func retain(_ slice: ByteBuffer) {
            if retained == nil { retained = CircularBuffer(initialCapacity: 4) }
            KeptBytes.appendKept(slice, to: &retained!)
            retainedBytes += slice.readableBytes
        }

        /// Lets go of the retained bytes below `offset`: the peer has them. Returns how many.
        @discardableResult
        func trimRetained(upTo offset: UInt64) -> Int {
            let before = retainedBytes
            while offset > retainedFrom, var first = retained?.first {
                let drop = Int(min(UInt64(first.readableBytes), offset - retainedFrom))
                if drop == first.readableBytes {
                    retained!.removeFirst()
                } else {
                    first.moveReaderIndex(forwardBy: drop)
                    first.makeKept()  // what is left of a buffer mostly credited must not pin all of it
                    retained![retained!.startIndex] = first
                }
                retainedFrom += UInt64(drop)
                retainedBytes -= drop
            }
            return before - retainedBytes
        }

        /// The mux a stream belongs to, read from the caller's loop when its channel closes.
        final class Owner: @unchecked Sendable {
            private let lock = NIOLock()
            private weak var _mux: TunnelMux?
            init(_ mux: TunnelMux) { _mux = mux }
            var mux: TunnelMux? {
                get { lock.withLock { _mux } }
                set { lock.withLock { _mux = newValue } }
            }
        }

        init(id: UInt32, openedBy opener: StreamStateMachine.Opener, sendWindow: Int, receive: ReceiveWindow) {
            self.id = id
            self.lifecycle = StreamStateMachine(openedBy: opener)
            self.send = SendWindow(initial: sendWindow)
            self.receive = receive
            self.charge = BudgetCharge(window: receive.size)
        }
    }
}
