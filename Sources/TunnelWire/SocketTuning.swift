import NIOCore

/// Socket settings shared by every channel that carries stream bytes.
public enum SocketTuning {
    /// Reads of up to 256 KiB (NIO's default stops at 64 KiB): a bulk transfer then costs a quarter of the
    /// `read` system calls and TLS unwraps, which is where a relay's time goes on loopback. The size adapts
    /// per channel, so small request/response traffic keeps small buffers.
    public static let receiveAllocator = AdaptiveRecvByteBufferAllocator(
        minimum: 1024, initial: 2048, maximum: 256 * 1024)
}

#if canImport(Glibc)
import Glibc
#endif

extension SocketTuning {
    /// `TCP_NOTSENT_LOWAT` of a paced tunnel socket (``TunnelLimits/pacedBelowBytesPerSecond``): the kernel keeps
    /// at most about this many unsent bytes. Without it the kernel takes up to its send buffer (about 850 KiB was
    /// measured on a 40 Mbit/s link) and every frame, a keystroke's among them, waits behind all of it. With it the
    /// bytes wait in the mux's queue, where the streams take turns (``TunnelMux/sendQueued()``).
    public static let pacedNotSentLowat = 8 * 1024
    /// A fast tunnel's: 0 gives the socket back the host's `net.ipv4.tcp_notsent_lowat` (no limit by default).
    public static let unlimitedNotSentLowat = 0

    /// A paced tunnel channel's write-buffer watermarks: the mux stops writing DATA above `high` and starts again
    /// below `low`.
    public static let pacedWriteBuffer = ChannelOptions.Types.WriteBufferWaterMark(low: 4 * 1024, high: 8 * 1024)
    /// A fast tunnel's: NIO's defaults.
    public static let fastWriteBuffer = ChannelOptions.Types.WriteBufferWaterMark(low: 32 * 1024, high: 64 * 1024)

    /// The socket option for `TCP_NOTSENT_LOWAT`.
    public static let notSentLowatOption = ChannelOptions.Types.SocketOption(
        level: NIOBSDSocket.OptionLevel(rawValue: CInt(IPPROTO_TCP)), name: NIOBSDSocket.Option(rawValue: CInt(TCP_NOTSENT_LOWAT)))
}

extension SocketTuning {
    /// The kernel's `struct tcp_info` as bytes (232 on Linux 6; fewer on older kernels, the rest stays zero).
    /// Glibc's `tcp_info` stops before `tcpi_notsent_bytes`, so the field is read at its offset in `linux/tcp.h`.
    struct LinuxTCPInfo: Sendable {
        var raw: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64,
                  UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64,
                  UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                             0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        /// `offsetof(struct tcp_info, tcpi_notsent_bytes)` (Linux 4.6 and later; the layout only grows).
        static let notSentOffset = 144
        /// `offsetof(struct tcp_info, tcpi_last_ack_recv)`: milliseconds since the last ACK arrived.
        static let lastAckReceivedOffset = 56
    }

    /// How long ago the peer's TCP last acknowledged anything on a TCP channel's socket, read on its event loop
    /// (`TCP_INFO`); nil for other channels. An ACK proves the path works both ways even when the peer's frames
    /// wait behind a queue (a slow line's bulk transfer): the agent's fast loss detection counts it as a sign of
    /// life (``Keepalive/Active``).
    public static func sinceLastAck(_ channel: Channel) -> TimeAmount? {
        #if os(Linux)
        guard let provider = channel as? SocketOptionProvider, channel.eventLoop.inEventLoop else { return nil }
        var since: TimeAmount?
        provider.unsafeGetSocketOption(level: .tcp, name: .tcp_info).whenSuccess { (info: LinuxTCPInfo) in
            let ms = withUnsafeBytes(of: info.raw) {
                $0.load(fromByteOffset: LinuxTCPInfo.lastAckReceivedOffset, as: UInt32.self)
            }
            since = .milliseconds(Int64(ms))
        }
        return since
        #else
        return nil
        #endif
    }

    /// Bytes a TCP channel's socket holds unsent, read on its event loop (`TCP_INFO`); nil for other channels.
    public static func unsentBytes(_ channel: Channel) -> Int? {
        #if os(Linux)
        guard let provider = channel as? SocketOptionProvider, channel.eventLoop.inEventLoop else { return nil }
        var unsent: Int?
        // On its own loop the option is read at once and the future is already complete.
        provider.unsafeGetSocketOption(level: .tcp, name: .tcp_info).whenSuccess { (info: LinuxTCPInfo) in
            unsent = withUnsafeBytes(of: info.raw) { Int($0.load(fromByteOffset: LinuxTCPInfo.notSentOffset, as: UInt32.self)) }
        }
        return unsent
        #else
        return nil
        #endif
    }
}
