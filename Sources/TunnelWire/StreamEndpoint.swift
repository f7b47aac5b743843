import NIOCore

/// What a tunnel stream's bytes go to, and what tells the ``TunnelMux`` that they were taken: a socket through
/// ``StreamGlue`` (every frontend with a connection per stream, and the agent's target connections), or a stream
/// multiplexed in a caller's own protocol (the gRPC frontend's connectIDs).
///
/// The mux calls these from its event loop. An endpoint answers through the mux's `attach`, `dataFromSocket`,
/// `socketInputClosed`, `socketClosed` and `consumedBySocket`, from any thread, and it owns the flow control
/// towards its caller: it credits bytes back (`consumedBySocket`) only once its caller took them, and reads no
/// more from its caller while paused. So a caller that stops reading holds at most the stream's window.
public protocol StreamEndpoint: AnyObject {
    /// The stream was resumed on `mux`'s connection: everything the endpoint says goes there from now on.
    func moveToTunnel(_ mux: TunnelMux)
    /// Bytes of one read of the tunnel, in order. They are slices of the tunnel's read buffer: an endpoint that
    /// keeps them past this call copies them (a slice keeps its whole buffer alive).
    func deliverFromTunnel(_ buffers: [ByteBuffer])
    /// Stop (true) or go on (false) reading from the caller.
    func setPausedFromTunnel(_ paused: Bool)
    /// The peer finished its side (FIN) after the last bytes delivered.
    func finishOutputFromTunnel()
    /// The stream was reset: the caller must see a failure, not a clean end.
    func resetFromTunnel()
}
