import NIOCore

/// Socket settings shared by every channel that carries stream bytes.
public enum SocketTuning {
    /// Reads of up to 256 KiB (NIO's default stops at 64 KiB): a bulk transfer then costs a quarter of the
    /// `read` system calls and TLS unwraps, which is where a relay's time goes on loopback. The size adapts
    /// per channel, so small request/response traffic keeps small buffers.
    public static let receiveAllocator = AdaptiveRecvByteBufferAllocator(
        minimum: 1024, initial: 2048, maximum: 256 * 1024)
}
