import Logging
import NIOCore
import NIOHTTP1
import NIOSSL
import TunnelPKI
import TunnelSupport
import TunnelWire

/// Answers one HTTP/1.1 `CONNECT host:port` on the secure port (the request kube-apiserver's egress selector
/// and `curl -p -x` send) and then turns the connection into a tunnel stream.
///
/// `200 Connection established` is written only once the agent has dialled the target, so a caller never sees
/// success followed by a broken pipe; otherwise 400/403/502/503/504 with a one-line reason, and the connection
/// closes. Responses are written as raw bytes: NIOHTTP1's encoder would add body framing to a CONNECT's 200.
/// Bytes the caller sent after its request are held (and reading paused) until the stream exists.
final class ConnectHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum State {
        case opening
        case done
    }

    private let server: TunnelServerCore
    private let target: String
    private var state = State.opening
    /// Caller bytes after the request head, for the stream.
    private var early: ByteBuffer?
    private var readPending = false
    /// The caller half-closed while the stream was opened: told to the glue after the early bytes.
    private var inputClosed = false

    /// ``HostRouter``, the only way in, has parsed the `CONNECT` head under its own deadline and refused callers
    /// presenting an agent certificate; `early` holds whatever followed the head.
    init(server: TunnelServerCore, target: String, early: ByteBuffer?) {
        self.server = server
        self.target = target
        self.early = early
    }

    func handlerAdded(context: ChannelHandlerContext) {
        guard let destination = HostPort(authority: target) else {
            respond(context, 400, "CONNECT target \"\(target)\" is not host:port")
            return
        }
        open(destination, context: context)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .opening = state else { return }
        var incoming = unwrapInboundIn(data)
        if early == nil { early = incoming } else { early!.writeBuffer(&incoming) }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event, case .opening = state {
            inputClosed = true
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func read(context: ChannelHandlerContext) {
        // No reading while the stream is being opened: the caller waits for the 200 (backpressure).
        if case .opening = state { readPending = true } else { context.read() }
    }

    private func open(_ target: HostPort, context: ChannelHandlerContext) {
        StreamDialer.open(target, server: server, for: context.channel) { _, failure in failure.reason }
            .whenSuccess { outcome in
                switch outcome {
                case .opened(let mux, let id, _):
                    guard context.channel.isActive else {
                        mux.cancelStream(id)
                        return
                    }
                    self.established(context, mux: mux, streamID: id)
                case .failed(let status, let message):
                    self.respond(context, status, message)
                }
            }
    }

    private func established(_ context: ChannelHandlerContext, mux: TunnelMux, streamID: UInt32) {
        state = .done
        var head = context.channel.allocator.buffer(capacity: 64)
        head.writeString("HTTP/1.1 200 Connection established\r\n\r\n")
        context.writeAndFlush(wrapOutboundOut(head), promise: nil)
        do {
            let pipeline = context.pipeline.syncOperations
            try pipeline.addHandler(
                StreamGlue(mux: mux, streamID: streamID, eventLoop: context.eventLoop), position: .after(self))
            if let early, early.readableBytes > 0 {
                self.early = nil
                context.fireChannelRead(wrapInboundOut(early))
                context.fireChannelReadComplete()
            }
            if inputClosed { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
            if readPending {
                readPending = false
                context.read()
            }
            pipeline.removeHandler(context: context, promise: nil)
        } catch {
            mux.cancelStream(streamID)
            context.close(promise: nil)
        }
    }

    private func respond(_ context: ChannelHandlerContext, _ status: Int, _ message: String) {
        state = .done
        early = nil
        HTTPErrorResponse.send(context, status, message, logger: server.logger)
    }
}
