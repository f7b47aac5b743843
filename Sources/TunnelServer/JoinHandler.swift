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
            do {
                try server.tokens.verify(request.token)
            } catch let error as PKIError where [.tokenNotFound, .invalidToken, .tokenExpired].contains(error.code) {
                // One answer whatever is wrong with the token, so that a prober cannot tell a known token id
                // from an unknown one; the operator's log says which.
                server.logger.warning("join refused: \(error)", metadata: ["remote": "\(remote)"])
                throw JoinRefusal.invalidToken
            }
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
        let refused = Refused(reason: reason)  // bounded: the reason may quote the peer's node name or CSR
        server.logger.warning("\(refused.reason)", metadata: ["remote": "\(remote)"])
        context.writeAndFlush(wrapOutboundOut(refused.frame(allocator: context.channel.allocator)))
            .whenComplete { _ in context.close(promise: nil) }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}

/// What a refused join is told when its token does not hold.
enum JoinRefusal: Error, CustomStringConvertible {
    case invalidToken

    var description: String {
        "the bootstrap token is not valid (unknown, wrong secret or expired): create one with edgetunnel token create"
    }
}
