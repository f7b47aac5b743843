import Logging
import NIOCore
import TunnelWire

/// Closes a connection on any error that reaches the end of its pipeline.
final class CloseOnErrorHandler: ChannelInboundHandler {
    typealias InboundIn = Any
    let logger: Logger
    let what: String

    init(logger: Logger, what: String) {
        self.logger = logger
        self.what = what
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        let remote = context.channel.remoteAddress?.description ?? "?"
        if error is FrameError {
            // The peer broke the protocol (or would make us break it): an operator wants to know which one.
            logger.warning("\(what) connection closed: \(error)", metadata: ["remote": "\(remote)"])
        } else {
            logger.debug("\(what) connection error: \(error)", metadata: ["remote": "\(remote)"])
        }
        context.close(promise: nil)
    }
}
