import Logging
import NIOCore
import TunnelSupport
import TunnelWire

/// Closes a connection on any error that reaches the end of its pipeline.
final class CloseOnErrorHandler: ChannelInboundHandler {
    typealias InboundIn = Any
    let logger: Logger
    let what: String
    /// Counts a limit a peer hit (``FrameError/limit``): `edge_tunnel_server_limit_hits_total{limit}`.
    let limitHits: LabeledCounters?

    init(logger: Logger, what: String, limitHits: LabeledCounters? = nil) {
        self.logger = logger
        self.what = what
        self.limitHits = limitHits
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        let remote = context.channel.remoteAddress?.description ?? "?"
        if let error = error as? FrameError {
            if let limit = error.limit { limitHits?.increment(limit) }
            // The peer broke the protocol (or would make us break it): an operator wants to know which one.
            logger.warning("\(what) connection closed: \(error)", metadata: ["remote": "\(remote)"])
        } else {
            logger.debug("\(what) connection error: \(error)", metadata: ["remote": "\(remote)"])
        }
        context.close(promise: nil)
    }
}
