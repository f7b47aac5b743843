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
    /// This side failed (reset by its peer, TLS ended without close_notify): the partner ends with an error too.
    private var failed = false

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
        partner?.partnerClose(abort: failed)
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
        failed = true
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

    /// The partner's channel closed; `abort` when it failed, so that a cut-short transfer never looks complete
    /// to this side's peer (``StreamGlue/abort(_:)``).
    private func partnerClose(abort: Bool) {
        guard let context else { return }
        if abort {
            StreamGlue.abort(context.channel)
        } else {
            context.close(promise: nil)
        }
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
