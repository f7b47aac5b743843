import Logging
import NIOCore
import TunnelPKI
import TunnelWire

/// Serves one bootstrap join on a tunnel-port connection that presented no client certificate: a valid
/// token and a CSR for a node name are answered with that node's certificate and the CA; anything else with
/// a reason. The connection closes after the answer either way.
final class JoinHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    typealias OutboundOut = Frame

    private let server: TunnelServerCore
    private var answered = false

    init(server: TunnelServerCore) {
        self.server = server
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        guard !answered else { return }
        answered = true
        let remote = context.channel.remoteAddress?.description ?? "unknown"
        guard frame.type == .join else {
            refuse(context, "this connection has no client certificate: only a bootstrap join is accepted", remote: remote)
            return
        }
        do {
            let request = try JoinRequest(frame: frame)
            try server.tokens.verify(request.token)
            let authority = try server.authority()
            let certificate = try authority.signNodeCSR(
                request.csrPEM, nodeName: request.nodeName, validity: server.configuration.agentCertificateValidity)
            let reply = JoinOK(
                certificatePEM: try PEMFiles.pem(certificate), caPEM: try PEMFiles.pem(authority.certificate))
            server.logger.info("node joined", metadata: ["node": "\(request.nodeName)", "remote": "\(remote)"])
            context.writeAndFlush(wrapOutboundOut(reply.frame(allocator: context.channel.allocator)))
                .whenComplete { _ in context.close(promise: nil) }
        } catch {
            refuse(context, "join refused: \(error)", remote: remote)
        }
    }

    private func refuse(_ context: ChannelHandlerContext, _ reason: String, remote: String) {
        server.logger.warning("\(reason)", metadata: ["remote": "\(remote)"])
        context.writeAndFlush(wrapOutboundOut(Refused(reason: reason).frame(allocator: context.channel.allocator)))
            .whenComplete { _ in context.close(promise: nil) }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}
