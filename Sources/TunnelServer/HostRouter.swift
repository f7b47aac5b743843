import Logging
import NIOCore
import NIOHTTP1
import NIOTLS
import TunnelPKI
import TunnelSupport
import TunnelWire

/// The first handler on the secure port (TLS, after the TLS handler) and the insecure port (plain HTTP), behind
/// NIOHTTP1's request decoder, which it adds in front of itself.
///
/// `CONNECT` goes to ``ConnectHandler``. Any other request is routed by its `Host` (a node name or a registered
/// node IP, default port 10250 on the secure port and 10255 on the insecure one) to that node's agent. The
/// requests are written on to the target as the decoder parsed them, their bodies re-framed, so the target reads
/// exactly what we checked; answers come back unchanged, so chunked responses (`kubectl logs -f`) arrive chunk by
/// chunk. After a request that upgrades (exec, attach, port-forward over SPDY or WebSocket) the decoder is removed
/// and bytes are relayed as they are until either side closes. On the secure port the server opens TLS to the
/// kubelet inside the stream with its proxy-client certificate. A connection stays bound to the node of its first
/// request.
///
/// A request in absolute form (`GET http://edge-7:9100/metrics HTTP/1.1`, what Go's HTTP client and curl send
/// to a forward proxy for `http://` URLs) is forwarded as a proxy does: plain HTTP to the URL's host and port,
/// the head rewritten to origin form with the hop-by-hop headers removed and `Connection: close`; the caller is
/// not read after it (the target closes after its answer, so the next request, perhaps for another node, comes
/// on a new connection).
///
/// While the stream is being opened the caller is not read (backpressure, as in ``ConnectHandler``): what was
/// decoded from the last read, a request body among it, is kept and goes first.
final class HostRouter: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Mode {
        /// Secure port: TLS from the caller (client certificate required), TLS to the kubelet.
        case tls
        /// Insecure port: plain HTTP both ways.
        case plain
    }

    private enum State {
        /// Waiting for the first request head.
        case head
        /// A `CONNECT` head is in; its end hands the connection to ``ConnectHandler``.
        case connect(target: String)
        /// The stream is being opened. The caller is not read meanwhile; requests are encoded into `pending`.
        case routing
        /// Requests are encoded and passed on to the relay.
        case relaying
        /// A forward-proxy request has ended: nothing more is read from the caller.
        case finished
        /// Answered with an error, or handed over.
        case done
    }

    private let server: TunnelServerCore
    private let mode: Mode
    private let decoder = RequestRoute.makeDecoder()
    private var encoder = RequestEncoder()
    private var state = State.head
    /// Encoded request bytes waiting for the stream.
    private var pending: ByteBuffer?
    /// The route is a forward-proxy request: one request only.
    private var forwarding = false
    /// The current request stops the decoder (an upgrade): after its end, bytes are relayed raw.
    private var upgrading = false
    /// The current request has ended.
    private var requestEnded = false
    private var readPending = false
    private var inputClosedWhileRouting = false
    private var headTimeout: Scheduled<Void>?

    init(server: TunnelServerCore, mode: Mode) {
        self.server = server
        self.mode = mode
    }

    func handlerAdded(context: ChannelHandlerContext) {
        do {
            try context.pipeline.syncOperations.addHandler(decoder, position: .before(self))
        } catch {
            context.close(promise: nil)
            return
        }
        headTimeout = context.eventLoop.scheduleTask(in: server.configuration.handshakeTimeout) { [weak self] in
            guard let self, case .head = self.state else { return }
            self.reject(context, 408, "request head not received in time")
        }
    }

    func read(context: ChannelHandlerContext) {
        switch state {
        case .connect, .routing: readPending = true
        case .finished: return
        case .head, .relaying: context.read()
        case .done: return  // answered or handed over: a caller that goes on sending is not read
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // The secure port requires a client certificate: a finished handshake is an authenticated caller.
        if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls {
            // An agent certificate is refused here (403): its handshake's timing must not weigh on overload.
            let agent =
                (try? context.pipeline.syncOperations.nioSSL_peerCertificate()?.x509())??
                .subject.organizations.contains(CertificateAuthority.agentOrganization) ?? false
            PendingConnectionHandler.authenticated(context.pipeline.syncOperations, timed: !agent)
        }
        // A caller that half-closes while its stream is opened: the relay learns it after the bytes before it.
        if case ChannelEvent.inputClosed = event, case .routing = state {
            inputClosedWhileRouting = true
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        headTimeout?.cancel()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        switch (state, part) {
        case (.head, .head(let head)):
            routeFirst(head, context: context)
        case (.head, _):
            reject(context, 400, "malformed request head")  // the decoder emits a head first; never reached
        case (.connect(let target), .end):
            handOverToConnect(context, target: target)
        case (.connect, _), (.finished, _), (.done, _):
            return
        case (.routing, _), (.relaying, _):
            encode(part, context: context)
        }
    }

    /// Encodes a request part for the target: into `pending` while routing, to the relay afterwards.
    private func encode(_ part: HTTPServerRequestPart, context: ChannelHandlerContext) {
        if requestEnded, forwarding { return }  // one request per forward-proxy connection
        var bytes: ByteBuffer
        switch part {
        case .head(let head):
            // Every request on the connection passes the checks the first one passed; a later one that fails
            // cannot be answered in order with the target's answers, so the connection closes.
            do {
                try RequestRoute.check(head)
            } catch {
                server.logger.info("closing a caller connection: a later request was refused: \(error)")
                state = .done
                context.close(promise: nil)
                return
            }
            requestEnded = false
            upgrading = RequestEncoder.endsHTTP(head)
            bytes = context.channel.allocator.buffer(capacity: 512)
            encoder.write(head, into: &bytes)
        case .body(let body):
            bytes = encoder.frame(body, allocator: context.channel.allocator)
        case .end(let trailers):
            if let trailers, (try? RequestRoute.check(trailers: trailers)) == nil {
                state = .done
                context.close(promise: nil)
                return
            }
            requestEnded = true
            bytes = context.channel.allocator.buffer(capacity: 0)
            encoder.end(trailers, into: &bytes)
        }
        if case .routing = state {
            if pending == nil { pending = bytes } else { pending!.writeBuffer(&bytes) }
            return
        }
        if bytes.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(bytes)) }
        if requestEnded { afterRequest(context) }
    }

    /// At the end of a request: a forward-proxy connection reads no more, an upgraded one relays raw bytes.
    private func afterRequest(_ context: ChannelHandlerContext) {
        if forwarding {
            state = .finished
            readPending = false
        } else if upgrading {
            state = .done
            handOverRaw(context)
            if readPending {
                readPending = false
                context.read()
            }
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
    }

    /// After `CONNECT` or an upgrade: the decoder goes, and the bytes it holds unparsed pass on to the handler
    /// after us — once its removal runs, on the next loop tick. A half-close that comes meanwhile would make it
    /// drop them (it forwards leftovers only without EOF), so a ``HalfCloseHolder`` in front of it keeps the
    /// event until the bytes are through; then a read-complete makes the relay flush them.
    private func handOverRaw(_ context: ChannelHandlerContext) {
        let sync = context.pipeline.syncOperations
        let holder = HalfCloseHolder()
        let removed = context.eventLoop.makePromise(of: Void.self)
        let pipeline = context.pipeline
        do {
            try sync.addHandler(holder, position: .before(decoder))
        } catch {
            context.close(promise: nil)
            return
        }
        sync.removeHandler(decoder, promise: removed)
        removed.futureResult.whenComplete { _ in
            pipeline.fireChannelReadComplete()
            holder.release()
        }
    }

    private func routeFirst(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        headTimeout?.cancel()
        PendingConnectionHandler.authenticated(context.pipeline.syncOperations)
        do {
            let decided = try RequestRoute(head, defaultPort: mode == .tls ? 10250 : 10255)
            var caller = context.channel.remoteAddress?.ipAddress.map { "address \($0)" } ?? "the Unix socket"
            if mode == .tls, let peer = try? context.pipeline.syncOperations.nioSSL_peerCertificate(),
                let certificate = try? peer.x509()
            {
                if certificate.subject.organizations.contains(CertificateAuthority.agentOrganization) {
                    reject(context, 403, "agent certificates cannot open streams")
                    return
                }
                caller = "certificate \(certificate.subject.commonName ?? "\(certificate.subject)")"
            }
            guard server.callerStreams.admit(caller, until: context.channel) else {
                server.metrics.limitHits.increment("streams_per_caller")
                reject(context, 429, "caller \(caller) has \(server.callerStreams.limit) streams open, its limit")
                return
            }
            switch decided {
            case .connect(let target):
                state = .connect(target: target)
            case .forward(let destination, let rewritten):
                forwarding = true
                state = .routing
                encode(.head(rewritten), context: context)
                route(to: destination, plain: true, context: context)
            case .node(let destination):
                state = .routing
                encode(.head(head), context: context)
                route(to: destination, plain: mode == .plain, context: context)
            }
        } catch let rejection as RequestRoute.Rejection {
            reject(context, rejection.status, rejection.reason)
        } catch {
            reject(context, 400, "malformed request head: \(error)")
        }
    }

    private func reject(_ context: ChannelHandlerContext, _ status: Int, _ message: String) {
        state = .done
        readPending = false
        pending = nil
        HTTPErrorResponse.send(context, status, message, logger: server.logger)
    }

    /// CONNECT requests are served by the CONNECT handler; the decoder, removed, hands it the bytes after the head.
    private func handOverToConnect(_ context: ChannelHandlerContext, target: String) {
        state = .done
        do {
            let sync = context.pipeline.syncOperations
            try sync.addHandler(ConnectHandler(server: server, target: target, early: nil), position: .after(self))
            handOverRaw(context)
            sync.removeHandler(context: context, promise: nil)
        } catch {
            context.close(promise: nil)
        }
    }

    /// `plain`: HTTP to the target as it is; otherwise TLS to the kubelet inside the stream.
    private func route(to destination: HostPort, plain: Bool, context: ChannelHandlerContext) {
        StreamDialer.open(destination, server: server, for: context.channel) { node, failure in
            "kubelet of node \(node) at \(destination): \(failure.reason)"
        }.whenSuccess { outcome in
            switch outcome {
            case .failed(let status, let message):
                self.reject(context, status, message)
            case .opened(let mux, let id, let node):
                guard context.channel.isActive else {
                    mux.cancelStream(id)
                    return
                }
                if plain {
                    self.relayPlain(context, mux: mux, streamID: id)
                } else {
                    self.relayTLS(context, mux: mux, streamID: id, node: node, destination: destination)
                }
            }
        }
    }

    /// Plain HTTP: the caller's socket is glued to the stream, the head read so far goes first.
    private func relayPlain(_ context: ChannelHandlerContext, mux: TunnelMux, streamID: UInt32) {
        do {
            let sync = context.pipeline.syncOperations
            try sync.addHandler(
                StreamGlue(mux: mux, streamID: streamID, eventLoop: context.eventLoop), position: .after(self))
            established(context)
        } catch {
            mux.cancelStream(streamID)
            context.close(promise: nil)
        }
    }

    /// HTTPS: TLS to the kubelet runs inside the stream (``KubeletTLSBridge``); once its handshake succeeded,
    /// the caller's decrypted bytes are relayed into it. A failed handshake is answered with 502 before anything
    /// was forwarded.
    private func relayTLS(
        _ context: ChannelHandlerContext, mux: TunnelMux, streamID: UInt32, node: String, destination: HostPort
    ) {
        KubeletTLSBridge.open(
            mux: mux, streamID: streamID, destination: destination, server: server, on: context.eventLoop
        )
        .whenComplete { result in
            switch result {
            case .failure(let error):
                mux.cancelStream(streamID)
                self.server.metrics.dialFailed(reason: "kubelet_tls")
                self.reject(context, 502, "TLS to the kubelet of node \(node) at \(destination) failed: \(error)")
            case .success(let (streamChannel, tlsChannel)):
                guard context.channel.isActive else {
                    tlsChannel.close(promise: nil)
                    return
                }
                // A caller that goes away resets the stream at once (StreamDialer tied it to the caller, through
                // whichever tunnel holds it after a resume); closing the TLS side alone would wait for the kubelet's
                // close_notify. Not `mux` here: this hook lives as long as the caller, and would keep the opening
                // tunnel, and its successors, alive.
                context.channel.closeFuture.whenComplete { _ in streamChannel.close(promise: nil) }
                do {
                    let (callerGlue, kubeletGlue) = RelayGlue.pair()
                    try tlsChannel.pipeline.syncOperations.addHandler(kubeletGlue)
                    let sync = context.pipeline.syncOperations
                    try sync.addHandler(callerGlue, position: .after(self))
                    self.established(context)
                } catch {
                    tlsChannel.close(promise: nil)
                    context.close(promise: nil)
                }
            }
        }
    }

    /// The relay after this handler is in place: what was encoded while routing goes first, then reading resumes
    /// (unless the request ended a forward-proxy connection or upgraded, see ``afterRequest(_:)``).
    private func established(_ context: ChannelHandlerContext) {
        state = .relaying
        if let bytes = pending, bytes.readableBytes > 0 {
            pending = nil
            context.fireChannelRead(wrapInboundOut(bytes))
            context.fireChannelReadComplete()
        }
        if inputClosedWhileRouting {
            inputClosedWhileRouting = false
            context.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        }
        if requestEnded { afterRequest(context) }
        if case .relaying = state, readPending {
            readPending = false
            context.read()
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // A head the decoder refused gets its one-line answer; anything later (a bad second request, TLS) closes.
        if case .head = state, error is HTTPParserError {
            let rejection = RequestRoute.rejection(for: error)
            reject(context, rejection.status, rejection.reason)
            return
        }
        context.close(promise: nil)
    }
}
