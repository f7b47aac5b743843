import NIOCore

/// Receives what a ``TunnelMux`` cannot handle itself. Called on the tunnel channel's event loop.
public protocol TunnelMuxDelegate: AnyObject {
    /// The peer asks for a new stream (agents receive these). Answer with ``TunnelMux/acceptStream(_:)`` once
    /// a glue is attached, or ``TunnelMux/rejectStream(_:code:reason:)``.
    func mux(_ mux: TunnelMux, didReceiveOpen open: Open, streamID: UInt32)
    /// A control frame on stream 0 other than PING/PONG/WINDOW (HELLO, REFUSED, GOAWAY, JOIN, RENEW, ...).
    func mux(_ mux: TunnelMux, didReceiveControl frame: Frame)
    /// The tunnel connection is gone; every stream has been reset, or handed over to the connection that resumed
    /// them (``TunnelMux/takeOver(_:)``).
    func muxDidClose(_ mux: TunnelMux)
    /// The connection of a resumable tunnel is gone and its streams wait, for the grace period, for a new
    /// connection to resume them (``TunnelMux/enableResume(grace:)``); ``muxDidClose(_:)`` follows either way.
    func muxDidSuspend(_ mux: TunnelMux)
    /// A stream of a resumable tunnel stopped keeping what it sends (the tunnel's ``TunnelLimits/maxRetained`` or the
    /// process's ``TunnelLimits/processRetained`` was reached): it is reset, not resumed, if the connection is lost.
    func muxStreamWillNotResume(_ mux: TunnelMux)
}

extension TunnelMuxDelegate {
    public func muxDidSuspend(_ mux: TunnelMux) {}
    public func muxStreamWillNotResume(_ mux: TunnelMux) {}
}
