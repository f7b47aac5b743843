import Logging
import NIOCore
import NIOSSL
import NIOTLS
import TunnelPKI
import TunnelSupport
import TunnelWire
import X509

/// Decides, once the TLS handshake on the tunnel port is done, what a connection is: an agent with a node
/// certificate gets a tunnel (``TunnelMux`` + ``AgentSession``); a caller without a certificate may only join.
/// The listener's ``ConnectionGate`` closes a connection that does not finish its handshake in time.
final class TunnelConnectionClassifier: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = Frame

    private let server: TunnelServerCore

    init(server: TunnelServerCore) {
        self.server = server
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let tlsEvent = event as? TLSUserEvent, case .handshakeCompleted = tlsEvent else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        let remote = context.channel.remoteAddress?.description ?? "unknown"
        do {
            let pipeline = context.pipeline.syncOperations
            let peerCertificate = try pipeline.nioSSL_peerCertificate()
            server.logger.trace("tunnel connection from \(remote): client certificate \(peerCertificate != nil)")
            if let peer = peerCertificate {
                let certificate = try peer.x509()
                guard certificate.subject.organizations.contains(CertificateAuthority.agentOrganization),
                    let node = certificate.subject.commonName, DNSName.isValid(node)
                else {
                    server.logger.warning(
                        "tunnel connection refused: certificate \(certificate.subject) is not an agent certificate",
                        metadata: ["remote": "\(remote)"])
                    context.close(promise: nil)
                    return
                }
                // Before the node records are loaded the HELLO is refused with that reason (AgentSession).
                guard
                    !server.identities.isLoaded
                        || server.identities.accepts(node: node, certificateValidFrom: certificate.notValidBefore)
                else {
                    server.logger.warning(
                        "tunnel connection refused: node \(node) is revoked or was reset after this certificate was issued",
                        metadata: ["remote": "\(remote)"])
                    context.close(promise: nil)
                    return
                }
                let mux = TunnelMux(role: .server, eventLoop: context.eventLoop, limits: server.limits)
                let session = AgentSession(
                    nodeName: node, certificate: certificate, channel: context.channel, mux: mux, server: server)
                mux.delegate = session
                try pipeline.addHandler(mux, position: .after(self))
                // Still counted in the listener's gate until its HELLO is accepted (AgentSession): a stolen
                // agent certificate cannot hold more connections without registering than a peer without one.
                session.start()
            } else {
                // A join stays in the listener's gate: counted per source, closed at its deadline.
                try pipeline.addHandler(JoinHandler(server: server), position: .after(self))
            }
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        } catch {
            server.logger.warning("tunnel connection failed: \(error)", metadata: ["remote": "\(remote)"])
            context.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // Handshake failures (no or wrong certificate, garbage bytes) end this connection only.
        server.logger.debug("tunnel connection error: \(error)")
        context.close(promise: nil)
    }
}
