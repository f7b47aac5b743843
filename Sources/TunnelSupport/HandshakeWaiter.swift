import NIOCore
import NIOTLS

/// Completes a promise when the TLS handshake of its channel finished (or failed).
public final class HandshakeWaiter: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    let promise: EventLoopPromise<Void>

    public init(promise: EventLoopPromise<Void>) { self.promise = promise }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls { promise.succeed(()) }
        context.fireUserInboundEventTriggered(event)
    }

    public func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(error)
        context.close(promise: nil)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        promise.fail(HandshakeClosed())
        context.fireChannelInactive()
    }
}

/// The connection closed before its TLS handshake completed.
public struct HandshakeClosed: Error, CustomStringConvertible {
    public init() {}
    public var description: String { "connection closed during the TLS handshake" }
}
