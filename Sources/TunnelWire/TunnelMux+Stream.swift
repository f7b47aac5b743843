import NIOCore

extension TunnelMux {
    /// One stream of the tunnel: its windows, what waits to be sent or delivered, and where it is in its life.
    /// Lives on the tunnel channel's event loop, like the mux.
    final class Stream {
        let id: UInt32
        var glue: StreamGlue?
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

        init(id: UInt32, openedBy opener: StreamStateMachine.Opener, sendWindow: Int, receive: ReceiveWindow) {
            self.id = id
            self.lifecycle = StreamStateMachine(openedBy: opener)
            self.send = SendWindow(initial: sendWindow)
            self.receive = receive
        }
    }
}
