import NIOCore
import NIOPosix
import TunnelWire

/// Relays bytes between two channels on the same event loop, each direction reading only while the other
/// side is writable (the GlueHandler pattern of swift-nio-ssh's examples). Half-close is passed on.
public final class RelayGlue: ChannelDuplexHandler {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private var partner: RelayGlue?
    private var context: ChannelHandlerContext?
    private var pendingRead = false
    private var inputClosed = false
    private var outputClosed = false

    private init() {}

    /// Two glues: add one to each channel (both channels must share an event loop).
    public static func pair() -> (RelayGlue, RelayGlue) {
        let first = RelayGlue()
        let second = RelayGlue()
        first.partner = second
        second.partner = first
        return (first, second)
    }

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        partner = nil
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        partner?.partnerWrite(unwrapInboundIn(data))
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        partner?.partnerFlush()
    }

    public func channelInactive(context: ChannelHandlerContext) {
        partner?.partnerClose()
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            inputClosed = true
            partner?.partnerWriteEOF()
            closeIfDone(context)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    public func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    public func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { partner?.partnerBecameWritable() }
    }

    public func read(context: ChannelHandlerContext) {
        if partner?.partnerWritable ?? false {
            context.read()
        } else {
            pendingRead = true
        }
    }

    private func partnerWrite(_ data: ByteBuffer) {
        context?.write(wrapOutboundOut(data), promise: nil)
    }

    private func partnerFlush() {
        context?.flush()
    }

    private func partnerWriteEOF() {
        guard let context, !outputClosed else { return }
        outputClosed = true
        context.close(mode: .output).whenFailure { _ in context.close(promise: nil) }
        closeIfDone(context)
    }

    private func partnerClose() {
        context?.close(promise: nil)
    }

    private func partnerBecameWritable() {
        if pendingRead {
            pendingRead = false
            context?.read()
        }
    }

    private var partnerWritable: Bool { context?.channel.isWritable ?? false }

    private func closeIfDone(_ context: ChannelHandlerContext) {
        if inputClosed && outputClosed { context.close(promise: nil) }
    }
}

extension ServerBootstrap {
    /// The options of a TCP listener whose connections carry stream bytes (the server's ports and
    /// `edgetunnel forward`): a deep backlog, address reuse, no Nagle delay, adaptive reads of up to 256 KiB,
    /// and half-close passed on unless `halfClosure` is false.
    public func streamListener(halfClosure: Bool = true) -> ServerBootstrap {
        let bootstrap = self.serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.recvAllocator, value: SocketTuning.receiveAllocator)
        return halfClosure ? bootstrap.childChannelOption(.allowRemoteHalfClosure, value: true) : bootstrap
    }
}

extension ClientBootstrap {
    /// The options of a TCP connection that carries stream bytes (the agent's tunnel and its dials to targets):
    /// no Nagle delay, adaptive reads of up to 256 KiB, and half-close passed on if `halfClosure`.
    public func streamConnection(halfClosure: Bool) -> ClientBootstrap {
        let bootstrap = self.channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelOption(.recvAllocator, value: SocketTuning.receiveAllocator)
        return halfClosure ? bootstrap.channelOption(.allowRemoteHalfClosure, value: true) : bootstrap
    }
}
