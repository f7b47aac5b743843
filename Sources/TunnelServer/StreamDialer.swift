import NIOCore
import TunnelSupport
import TunnelWire

/// Opens a stream to a node's target for a caller — the part every frontend shares (CONNECT, Host routing, the
/// Unix socket, and any later one): find the node's agent, ask it to dial within the dial timeout, tie the stream
/// to the caller's channel, record the metrics, and turn every failure into the HTTP status and one-line reason
/// the caller gets.
///
/// Tied to the caller: once its channel closes, the stream goes with it, whatever the frontend did or did not get
/// to do (``TunnelMux/openStream(target:until:)``). A caller that gives up during the dial cancels the open (RST to
/// the agent, which drops the target connection); one whose channel closed as the 200 was written, before the
/// stream's glue was in place, has its stream reset. Either used to leave the stream, and the agent's connection
/// to the target, open for good.
enum StreamDialer {
    enum Outcome {
        case opened(mux: TunnelMux, streamID: UInt32, node: String)
        case failed(status: Int, message: String)
    }

    /// Completes on the caller's event loop. `describe` words an agent's dial failure (403 is always worded as
    /// policy, 504 as a dial timeout).
    static func open(
        _ target: HostPort, server: TunnelServerCore, for caller: Channel,
        describe: @escaping (_ node: String, _ failure: OpenFail) -> String
    ) -> EventLoopFuture<Outcome> {
        open(
            target, server: server, on: caller.eventLoop, until: caller.closeFuture, callerActive: { caller.isActive },
            describe: describe)
    }

    /// The same for a caller that is not a channel of its own (a gRPC connectID): the stream ends when `ended`
    /// completes, and `callerActive` says whether it has yet. Completes on `loop`.
    static func open(
        _ target: HostPort, server: TunnelServerCore, on loop: EventLoop, until ended: EventLoopFuture<Void>,
        callerActive: @escaping () -> Bool, describe: @escaping (_ node: String, _ failure: OpenFail) -> String
    ) -> EventLoopFuture<Outcome> {
        guard let session = server.registry.lookup(host: target.host) else {
            server.metrics.dialFailed(reason: "no_agent")
            return loop.makeSucceededFuture(.failed(status: 502, message: "no agent for node \(target.host)"))
        }
        guard callerActive() else {  // gone before anything was asked of the agent
            return loop.makeSucceededFuture(.failed(status: OpenFail.callerGoneCode, message: callerGone))
        }
        let promise = loop.makePromise(of: Outcome.self)
        let started = NIODeadline.now()
        let mux = session.mux
        // The mux answers 504 itself when the agent does not answer within the dial timeout
        // (TunnelLimits.openTimeout), and reclaims the stream; it also ends the stream when the caller's channel
        // closes, opening or open.
        mux.openStream(target: target.description, until: ended).hop(to: loop).whenSuccess { result in
            if case .failed(let failure) = result, failure.code == OpenFail.callerGoneCode, !callerActive() {
                // Cancelled by the caller: no dial failure, nobody to answer.
                promise.succeed(.failed(status: OpenFail.callerGoneCode, message: callerGone))
                return
            }
            server.metrics.dialDuration.recordNanoseconds(Int64((NIODeadline.now() - started).nanoseconds))
            switch result {
            case .opened(let id):
                promise.succeed(.opened(mux: mux, streamID: id, node: session.nodeName))
            case .failed(var failure):
                // The agent's answer: its code becomes our HTTP status only if it is an error status, and its
                // reason (decoded as sent, not through OpenFail's init) is shortened and escaped.
                failure.code = (400...599).contains(failure.code) ? failure.code : 502
                failure.reason = PeerText.bounded(failure.reason)
                if let limit = failure.limit, knownLimits.contains(limit) {  // the agent's word: known names only
                    server.metrics.limitHits.increment(limit)
                }
                server.metrics.dialFailed(reason: reason(for: failure.code))
                let message: String
                switch failure.code {
                case 403: message = "refused by agent policy: \(failure.reason)"
                case 504: message = "dial timeout: \(describe(session.nodeName, failure))"
                default: message = describe(session.nodeName, failure)
                }
                promise.succeed(.failed(status: failure.code, message: message))
            }
        }
        return promise.futureResult
    }

    static let callerGone = "the caller went away while the stream was opening"

    /// The limits an OPEN_FAIL may name (an agent's answer is a label value: anything else is not counted).
    static let knownLimits: Set<String> = ["streams_per_agent", "pending_opens", "buffer_budget"]

    /// The `reason` label of `edge_tunnel_server_dial_failures_total` for an agent's answer.
    static func reason(for code: Int) -> String {
        switch code {
        case 403: "policy"
        case 504: "timeout"
        case 503: "unavailable"
        default: "unreachable"
        }
    }
}
