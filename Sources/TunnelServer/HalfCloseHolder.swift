import NIOCore

/// Holds back a caller's half-close while the request decoder is being removed (see `HostRouter.handOverRaw`),
/// then passes it on and leaves.
final class HalfCloseHolder: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    private var context: ChannelHandlerContext?
    private var held = false
    private var released = false

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event, !released {
            held = true
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func release() {
        guard let context, !released else { return }
        released = true
        if held { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
