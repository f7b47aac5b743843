import NIOCore
import NIOPosix
import NIOSSL
import TunnelPKI
import TunnelSupport
import TunnelWire

#if canImport(Glibc)
import Glibc
#endif

/// TLS to a kubelet inside a tunnel stream. The TLS client needs a channel of its own, and a stream is not a
/// socket: one end of a socket pair is glued to the stream, the other carries the TLS client, which the server
/// runs with its proxy-client certificate. With `kubeletCAFile` configured, the kubelet's certificate must also
/// name the address asked for (``KubeletName``).
enum KubeletTLSBridge {
    /// Both ends of the pair once the handshake with the kubelet succeeded within the dial timeout: the stream's
    /// side (glued to the stream) and the TLS side (decrypted bytes, nothing after the TLS handler yet). On a
    /// failure both are closed; the stream itself is the caller's to cancel.
    static func open(
        mux: TunnelMux, streamID: UInt32, destination: HostPort, server: TunnelServerCore, on loop: EventLoop
    ) -> EventLoopFuture<(stream: Channel, tls: Channel)> {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else {
            return loop.makeFailedFuture(
                HTTPErrorResponse.Failure(
                    description: "cannot create a socket pair: \(String(cString: strerror(errno)))"))
        }
        let kubeletTLS = server.kubeletClientContext
        let timeout = server.configuration.dialTimeout
        let deadline = NIODeadline.now() + timeout
        let streamSide = NIOPipeBootstrap(group: loop)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        StreamGlue(mux: mux, streamID: streamID, eventLoop: channel.eventLoop))
                }
            }
            .takingOwnershipOfDescriptor(inputOutput: fds[0])
        let tlsSide = NIOPipeBootstrap(group: loop)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .takingOwnershipOfDescriptor(inputOutput: fds[1])
        let checkName = server.configuration.kubeletCAFile != nil
        // When one side fails to come up, the other one (if it did) is closed: each owns a descriptor.
        let both = streamSide.and(tlsSide)
        both.whenFailure { _ in
            streamSide.whenSuccess { $0.close(promise: nil) }
            tlsSide.whenSuccess { $0.close(promise: nil) }
        }
        return both.flatMap { (streamChannel, tlsChannel) in
            TLSClient.handshake(
                on: tlsChannel, context: kubeletTLS, serverHostname: TLSClient.serverName(for: destination.host),
                deadline: deadline, timeout: timeout
            ).flatMapThrowing { () throws -> (stream: Channel, tls: Channel) in
                if checkName {
                    try KubeletName.check(
                        try tlsChannel.pipeline.syncOperations.nioSSL_peerCertificate(), for: destination)
                }
                return (streamChannel, tlsChannel)
            }.flatMapErrorThrowing { error in
                streamChannel.close(promise: nil)
                tlsChannel.close(promise: nil)
                throw error
            }
        }
    }
}
