import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOTLS
import TunnelPKI
import TunnelSupport
import TunnelWire
import X509

#if canImport(Glibc)
import Glibc
#endif

/// The first handler on the secure port (TLS, after the TLS handler) and the insecure port (plain HTTP).
///
/// It reads the first request head only. `CONNECT` goes to ``ConnectHandler``. Any other request is routed
/// by its `Host` (a node name or a registered node IP, default port 10250 on the secure port and 10255 on
/// the insecure one) to that node's agent, and from then on bytes are relayed unchanged both ways — so
/// chunked responses (`kubectl logs -f`) arrive chunk by chunk and `Connection: Upgrade` exchanges (exec,
/// attach, port-forward over SPDY or WebSocket) pass their 101 and carry bytes until either side closes. On
/// the secure port the server opens TLS to the kubelet inside the stream with its proxy-client certificate.
/// A connection stays bound to the node of its first request.
///
/// A request in absolute form (`GET http://edge-7:9100/metrics HTTP/1.1`, what Go's HTTP client and curl send
/// to a forward proxy for `http://` URLs) is forwarded as a proxy does: plain HTTP to the URL's host and port,
/// the head rewritten to origin form with the hop-by-hop headers removed and `Connection: close` (the target
/// closes after its answer, so the next request on the caller's connection, perhaps for another node, comes
/// on a new connection).
///
/// While the stream is being opened the caller is not read (backpressure, as in ``ConnectHandler``): bytes
/// that arrived with the head, a request body among them, are kept and go first.
final class HostRouter: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
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
        /// Reading the request head.
        case head
        /// The head is in; the stream is being opened. The caller is not read meanwhile.
        case routing
        /// Relaying, or answered with an error.
        case done
    }

    private let server: TunnelServerCore
    private let mode: Mode
    /// The bytes read so far: the head, and whatever followed it in the same reads.
    private var buffer: ByteBuffer?
    /// How many bytes of `buffer` were searched for the end of the head (each byte is searched once).
    private var scanned = 0
    private var state = State.head
    private var readPending = false
    private var headTimeout: Scheduled<Void>?

    init(server: TunnelServerCore, mode: Mode) {
        self.server = server
        self.mode = mode
    }

    func handlerAdded(context: ChannelHandlerContext) {
        headTimeout = context.eventLoop.scheduleTask(in: server.configuration.handshakeTimeout) { [weak self] in
            guard let self, case .head = self.state else { return }
            self.reject(context, 408, "request head not received in time")
        }
    }

    func read(context: ChannelHandlerContext) {
        if case .routing = state { readPending = true } else { context.read() }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // The secure port requires a client certificate: a finished handshake is an authenticated caller.
        if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls {
            PendingConnectionHandler.authenticated(context.pipeline.syncOperations)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        headTimeout?.cancel()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        switch state {
        case .done:
            return
        case .routing:
            buffer?.writeBuffer(&incoming)  // at most the rest of the current read: reading is paused
            return
        case .head:
            break
        }
        if buffer == nil { buffer = incoming } else { buffer!.writeBuffer(&incoming) }
        let view = buffer!.readableBytesView
        // Search only the new bytes (and the three before them, for a blank line split across reads).
        let from = max(0, scanned - 3)
        guard let end = RequestHead.end(in: view.dropFirst(from)).map({ $0 + from }) else {
            scanned = view.count
            if view.count > RequestHead.maxSize {
                reject(context, 431, "request header block is larger than \(RequestHead.maxSize / 1024) KiB")
            }
            return
        }
        guard end <= RequestHead.maxSize else {
            reject(context, 431, "request header block is larger than \(RequestHead.maxSize / 1024) KiB")
            return
        }
        headTimeout?.cancel()
        state = .routing
        PendingConnectionHandler.authenticated(context.pipeline.syncOperations)
        // RequestHead throws only rejections (status and reason); the head and its Host are checked in one go.
        do {
            let head = try RequestHead(parsing: view.prefix(end))
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
            if head.method == "CONNECT" {
                handOverToConnect(context, target: head.target, headLength: end)
                return
            }
            if let forward = try head.forwardProxyRequest() {
                // Absolute form: a forward-proxy request, plain HTTP to the URL's target, in origin form.
                buffer!.moveReaderIndex(forwardBy: end)
                var rewritten = context.channel.allocator.buffer(capacity: forward.head.utf8.count + buffer!.readableBytes)
                rewritten.writeString(forward.head)
                rewritten.writeBuffer(&buffer!)
                buffer = rewritten
                route(to: forward.destination, plain: true, context: context)
                return
            }
            route(to: try head.destination(defaultPort: mode == .tls ? 10250 : 10255), plain: mode == .plain, context: context)
        } catch let rejection as RequestHead.Rejection {
            reject(context, rejection.status, rejection.reason)
        } catch {
            reject(context, 400, "malformed request head: \(error)")
        }
    }

    private func reject(_ context: ChannelHandlerContext, _ status: Int, _ message: String) {
        state = .done
        readPending = false
        buffer = nil
        HTTPErrorResponse.send(context, status, message, logger: server.logger)
    }

    /// CONNECT requests are served by the CONNECT handler, with the bytes read after the head.
    private func handOverToConnect(_ context: ChannelHandlerContext, target: String, headLength: Int) {
        guard var bytes = buffer else { return }
        buffer = nil
        state = .done
        bytes.moveReaderIndex(forwardBy: headLength)
        do {
            let sync = context.pipeline.syncOperations
            try sync.addHandler(
                ConnectHandler(server: server, target: target, early: bytes.readableBytes > 0 ? bytes : nil),
                position: .after(self))
            sync.removeHandler(context: context, promise: nil)
        } catch {
            context.close(promise: nil)
        }
    }

    /// `plain`: HTTP to the target as it is; otherwise TLS to the kubelet inside the stream.
    private func route(to destination: HostPort, plain: Bool, context: ChannelHandlerContext) {
        StreamDialer.open(destination, server: server, on: context.eventLoop) { node, failure in
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
            try sync.addHandler(StreamGlue(mux: mux, streamID: streamID, eventLoop: context.eventLoop), position: .after(self))
            guard let bytes = buffer else {
                mux.cancelStream(streamID)
                return
            }
            buffer = nil
            state = .done
            context.fireChannelRead(wrapInboundOut(bytes))
            resumeReading(context)
            sync.removeHandler(context: context, promise: nil)
        } catch {
            mux.cancelStream(streamID)
            context.close(promise: nil)
        }
    }

    /// HTTPS: TLS to the kubelet runs inside the stream. One end of a socket pair is glued to the stream,
    /// the other carries the TLS client; once its handshake succeeded, the caller's decrypted bytes are
    /// relayed into it. A failed handshake is answered with 502 before anything was forwarded.
    private func relayTLS(
        _ context: ChannelHandlerContext, mux: TunnelMux, streamID: UInt32, node: String, destination: HostPort
    ) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else {
            mux.cancelStream(streamID)
            reject(context, 502, "cannot create a socket pair: \(String(cString: strerror(errno)))")
            return
        }
        let loop = context.eventLoop
        let kubeletTLS = server.kubeletClientContext
        let handshake = loop.makePromise(of: Void.self)
        let waiter = HandshakeWaiter(promise: handshake)
        let streamSide = NIOPipeBootstrap(group: loop)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(StreamGlue(mux: mux, streamID: streamID, eventLoop: channel.eventLoop))
                }
            }
            .takingOwnershipOfDescriptor(inputOutput: fds[0])
        let tlsSide = NIOPipeBootstrap(group: loop)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sni = IPAddress(destination.host) == nil ? destination.host : nil
                    try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: kubeletTLS, serverHostname: sni))
                    try channel.pipeline.syncOperations.addHandler(waiter)
                }
            }
            .takingOwnershipOfDescriptor(inputOutput: fds[1])
        let timer = loop.scheduleTask(in: server.configuration.dialTimeout) {
            handshake.fail(HTTPErrorResponse.Failure(description: "TLS handshake timed out"))
        }
        let checkName = server.configuration.kubeletCAFile != nil
        streamSide.and(tlsSide).flatMap { (streamChannel, tlsChannel) in
            handshake.futureResult.flatMapThrowing { () throws -> (any Channel, any Channel) in
                if checkName {
                    try KubeletName.check(try tlsChannel.pipeline.syncOperations.nioSSL_peerCertificate(), for: destination)
                }
                return (streamChannel, tlsChannel)
            }.flatMapErrorThrowing { error in
                streamChannel.close(promise: nil)
                tlsChannel.close(promise: nil)
                throw error
            }
        }.whenComplete { result in
            timer.cancel()
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
                // A caller that goes away resets the stream at once; closing the TLS side alone would wait for
                // the kubelet's close_notify.
                context.channel.closeFuture.whenComplete { _ in
                    mux.cancelStream(streamID)
                    streamChannel.close(promise: nil)
                }
                do {
                    let (callerGlue, kubeletGlue) = RelayGlue.pair()
                    tlsChannel.pipeline.syncOperations.removeHandler(waiter, promise: nil)
                    try tlsChannel.pipeline.syncOperations.addHandler(kubeletGlue)
                    let sync = context.pipeline.syncOperations
                    try sync.addHandler(callerGlue, position: .after(self))
                    if let bytes = self.buffer { tlsChannel.writeAndFlush(bytes, promise: nil) }
                    self.buffer = nil
                    self.state = .done
                    self.resumeReading(context)
                    sync.removeHandler(context: context, promise: nil)
                } catch {
                    tlsChannel.close(promise: nil)
                    context.close(promise: nil)
                }
            }
        }
    }

    /// A read held while the stream was opened is issued now, towards the glue that took over.
    private func resumeReading(_ context: ChannelHandlerContext) {
        guard readPending else { return }
        readPending = false
        context.read()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}

/// The kubelet's serving certificate must name the host the caller asked for — its node name or the node IP —
/// as kube-apiserver checks when it reaches kubelets directly. The chain was verified by the TLS handshake;
/// NIOSSL's own name check cannot run here: the kubelet sits behind a socket pair that has no peer IP.
enum KubeletName {
    struct Mismatch: Error, CustomStringConvertible { let description: String }

    static func check(_ certificate: NIOSSLCertificate?, for destination: HostPort) throws {
        guard let certificate else { throw Mismatch(description: "the kubelet presented no certificate") }
        let sans: ServerSANs
        do {
            sans = try CertificateSummary.sans(of: Certificate(derEncoded: try certificate.toDERBytes()))
        } catch {
            throw Mismatch(description: "the kubelet's certificate cannot be read: \(error)")
        }
        if let ip = IPAddress(destination.host) {
            if sans.ipAddresses.contains(ip) { return }
        } else if sans.dnsNames.contains(where: { $0.lowercased() == destination.host }) {
            return
        }
        let names = sans.dnsNames + sans.ipAddresses.map(\.description)
        throw Mismatch(description: "the kubelet's certificate names \(names.isEmpty ? "no host" : names.joined(separator: ", ")), "
            + "not \(destination.host)")
    }
}

/// Answers with an HTTP status and a one-line reason as raw bytes, then closes.
enum HTTPErrorResponse {
    struct Failure: Error, CustomStringConvertible { let description: String }

    static func send(_ context: ChannelHandlerContext, _ status: Int, _ message: String, logger: Logger) {
        guard context.channel.isActive else { return }
        let status = (400...599).contains(status) ? status : 502  // NIO traps on some codes; errors only here
        logger.info("answered \(status): \(message)", metadata: [
            "remote": "\(context.channel.remoteAddress?.description ?? "?")",
        ])
        let body = message + "\n"
        let phrase = HTTPResponseStatus(statusCode: status).reasonPhrase
        var buffer = context.channel.allocator.buffer(capacity: 128 + body.utf8.count)
        buffer.writeString("HTTP/1.1 \(status) \(phrase)\r\n")
        buffer.writeString("Content-Type: text/plain; charset=utf-8\r\nContent-Length: \(body.utf8.count)\r\n")
        buffer.writeString("Connection: close\r\n\r\n\(body)")
        context.writeAndFlush(NIOAny(buffer)).whenComplete { _ in context.close(promise: nil) }
        // A peer that does not read (or never finished its TLS handshake, which holds the write back) is
        // closed anyway: an answer owed must not keep a socket open.
        let channel = context.channel
        context.eventLoop.scheduleTask(in: .seconds(2)) { channel.close(promise: nil) }
    }
}
