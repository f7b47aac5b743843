import NIOCore

/// Socket settings shared by every channel that carries stream bytes.
public enum SocketTuning {
    /// Reads of up to 256 KiB (NIO's default stops at 64 KiB): a bulk transfer then costs a quarter of the
    /// `read` system calls and TLS unwraps, which is where a relay's time goes on loopback. The size adapts
    /// per channel, so small request/response traffic keeps small buffers.
    public static let receiveAllocator = AdaptiveRecvByteBufferAllocator(
        minimum: 1024, initial: 2048, maximum: 256 * 1024)

    /// Reads per readable event of a socket that carries one stream. NIO's default (4) reads on without asking the
    /// pipeline again, so a stream paused for want of credit still took up to four reads (1 MiB) that no budget
    /// counted; at one, a stream holds at most the one read that crossed its credit (issue 25's hostile review).
    public static let streamSocketReads: UInt = 1
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
        level: NIOBSDSocket.OptionLevel(rawValue: CInt(IPPROTO_TCP)),
        name: NIOBSDSocket.Option(rawValue: CInt(TCP_NOTSENT_LOWAT)))
}

extension SocketTuning {
    /// The kernel's `struct tcp_info` as bytes (232 on Linux 6; fewer on older kernels, the rest stays zero).
    /// Glibc's `tcp_info` stops before `tcpi_notsent_bytes`, so the field is read at its offset in `linux/tcp.h`.
    struct LinuxTCPInfo: Sendable {
        var raw:
            (
                UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64,
                UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64,
                UInt64, UInt64, UInt64, UInt64, UInt64
            ) = (
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            )
        /// `offsetof(struct tcp_info, tcpi_notsent_bytes)` (Linux 4.6 and later; the layout only grows).
        static let notSentOffset = 144
        /// `offsetof(struct tcp_info, tcpi_last_ack_recv)`: milliseconds since the last ACK arrived.
        static let lastAckReceivedOffset = 56
        /// `tcpi_backoff` (u8), `tcpi_rto` and `tcpi_rtt` (u32, microseconds).
        static let backoffOffset = 4
        static let rtoOffset = 8
        static let rttOffset = 68
    }

    /// What a TCP socket's kernel knows of its path (`TCP_INFO`), for the agent's fast loss detection
    /// (``Keepalive/Active``).
    public struct PathTiming: Sendable {
        /// How long ago the peer's TCP last acknowledged anything. An ACK proves the path works both ways even when
        /// the peer's frames wait behind a queue (a slow line's bulk transfer).
        public var sinceLastAck: TimeAmount
        /// The retransmission timeout without its exponential backoff, and the smoothed round-trip time.
        public var baseRTO: TimeAmount
        public var rtt: TimeAmount

        /// The shortest silence that may be called a lost path on this socket: three retransmission timeouts and a
        /// round trip (on a 300-ms path a one-second blip must not count; on loopback this is well under 1.5 s).
        public var shortestLoss: TimeAmount { baseRTO * 3 + rtt }
    }

    /// The path timing of a TCP channel's socket, read on its event loop; nil for other channels.
    public static func pathTiming(_ channel: Channel) -> PathTiming? {
        #if os(Linux)
        guard let provider = channel as? SocketOptionProvider, channel.eventLoop.inEventLoop else { return nil }
        var timing: PathTiming?
        provider.unsafeGetSocketOption(level: .tcp, name: .tcp_info).whenSuccess { (info: LinuxTCPInfo) in
            timing = withUnsafeBytes(of: info.raw) { raw in
                let ack = raw.load(fromByteOffset: LinuxTCPInfo.lastAckReceivedOffset, as: UInt32.self)
                let backoff = min(raw.load(fromByteOffset: LinuxTCPInfo.backoffOffset, as: UInt8.self), 16)
                let rto = raw.load(fromByteOffset: LinuxTCPInfo.rtoOffset, as: UInt32.self) >> backoff
                let rtt = raw.load(fromByteOffset: LinuxTCPInfo.rttOffset, as: UInt32.self)
                return PathTiming(
                    sinceLastAck: .milliseconds(Int64(ack)), baseRTO: .microseconds(Int64(rto)),
                    rtt: .microseconds(Int64(rtt)))
            }
        }
        return timing
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
            unsent = withUnsafeBytes(of: info.raw) {
                Int($0.load(fromByteOffset: LinuxTCPInfo.notSentOffset, as: UInt32.self))
            }
        }
        return unsent
        #else
        return nil
        #endif
    }
}
