import Logging
import NIOCore
import NIOPosix
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
            refuse(
                context, "this connection has no client certificate: only a bootstrap join is accepted", remote: remote)
            return
        }
        guard server.joins.admit(context.channel.remoteAddress?.ipAddress ?? "local") else {
            server.metrics.limitHits.increment("join_rate")
            refuse(
                context, "join refused: too many joins from this address, try again in \(server.joins.window.seconds)s",
                remote: remote)
            return
        }
        guard server.identities.isLoaded else {
            refuse(
                context, "join refused: the server has not loaded its tokens and node records yet: try again",
                remote: remote)
            return
        }
        do {
            let request = try JoinRequest(frame: frame)
            let token: StoredToken
            do {
                token = try server.joins.verify(request.token)
            } catch let error as PKIError where [.tokenNotFound, .invalidToken, .tokenExpired].contains(error.code) {
                // One answer whatever is wrong with the token, so that a prober cannot tell a known token id
                // from an unknown one; the operator's log says which.
                server.logger.warning("join refused: \(error)", metadata: ["remote": "\(remote)"])
                throw JoinRefusal.invalidToken
            }
            guard token.allows(node: request.nodeName) else {
                throw JoinRefusal.nodeNotAllowed(token: token.id, node: PeerText.bounded(request.nodeName))
            }
            var ips: [IPAddress] = []
            // A node has a few addresses; each one named costs a certificate SAN and, with replicas, a claim
            // written to the API server.
            guard (request.nodeIPs ?? []).count <= JoinRefusal.maxNodeIPs else {
                throw JoinRefusal.tooManyIPs(request.nodeIPs?.count ?? 0)
            }
            for text in request.nodeIPs ?? [] {
                guard let ip = IPAddress(text) else { throw JoinRefusal.badIP(PeerText.bounded(text)) }
                if !ips.contains(ip) { ips.append(ip) }
            }
            try token.checkNodeIPs(ips)
            let authority = try server.authority()
            try server.identities.reloadIfChanged()  // a reset a moment ago counts
            let certificate = try authority.signNodeCSR(
                request.csrPEM, nodeName: request.nodeName, ips: ips,
                validity: server.configuration.agentCertificateValidity,
                now: server.identities.issuingTime(for: request.nodeName))
            let reply = JoinOK(
                certificatePEM: try PEMFiles.pem(certificate), caPEM: try PEMFiles.pem(authority.certificate))
            // Recorded last: a name is taken only by a join that gets its certificate.
            guard let joinState = server.joinState else {
                // Written under nodes.json's file lock, which an operator's `edgetunnel node` command may hold for
                // as long as it likes: waited for on a thread of the pool, not on this event loop, which serves
                // every other connection too (on 2 cores the server's only one).
                let (identities, name, validFrom) = (server.identities, request.nodeName, certificate.notValidBefore)
                NIOThreadPool.singleton.runIfActive(eventLoop: context.eventLoop) {
                    try identities.recordJoin(name, ips: ips, certificateValidFrom: validFrom)
                }.whenComplete { result in
                    switch result {
                    case .success: self.accept(context, reply, node: name, remote: remote) { _ in }
                    case .failure(let error): self.refuse(context, "join refused: \(error)", remote: remote)
                    }
                }
                return
            }
            // In Kubernetes objects: written by the API server, answered when it has (or has refused).
            let (name, ipTexts, validFrom) = (request.nodeName, ips.map(\.description), certificate.notValidBefore)
            let recorded = context.eventLoop.makePromise(of: NodeRecord.self)
            recorded.completeWithTask {
                try await joinState.joinRecord(name, ips: ipTexts, certificateValidFrom: validFrom)
            }
            let server = server
            recorded.futureResult.whenComplete { result in
                switch result {
                case .success(let record):
                    server.refreshIdentities()
                    self.accept(context, reply, node: name, remote: remote) { delivered in
                        guard !delivered else { return }
                        // Recorded, but the certificate never reached the node (the connection closed while the API
                        // server wrote): undo this join, so the name is not locked out until an operator resets it.
                        server.logger.warning(
                            "join of \(name) recorded but its certificate was not delivered: undoing it")
                        let logger = server.logger
                        Task {
                            do { try await joinState.undoJoin(record) } catch {
                                logger.warning("cannot undo the join of \(name): \(error)")
                            }
                        }
                    }
                case .failure(let error):
                    self.refuse(context, "join refused: \(error)", remote: remote)
                }
            }
        } catch {
            refuse(context, "join refused: \(error)", remote: remote)
        }
    }

    /// Sends the certificate; `delivered` says whether the write reached the socket.
    private func accept(
        _ context: ChannelHandlerContext, _ reply: JoinOK, node: String, remote: String,
        delivered: @escaping (Bool) -> Void
    ) {
        guard context.channel.isActive else { return delivered(false) }
        let logger = server.logger
        context.writeAndFlush(wrapOutboundOut(reply.frame(allocator: context.channel.allocator)))
            .whenComplete { result in
                if case .success = result {
                    logger.info("node joined", metadata: ["node": "\(node)", "remote": "\(remote)"])
                }
                delivered((try? result.get()) != nil)
                context.close(promise: nil)
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
    case nodeNotAllowed(token: String, node: String)
    case badIP(String)
    case tooManyIPs(Int)

    /// Node IPs one join may name.
    static let maxNodeIPs = 16

    var description: String {
        switch self {
        case .invalidToken:
            "the bootstrap token is not valid (unknown, wrong secret or expired): create one with edgetunnel token create"
        case .nodeNotAllowed(let token, let node):
            "bootstrap token \(token) is not for node \(node) (see its --node patterns)"
        case .badIP(let text):
            "node IP \"\(text)\" is not an IP address"
        case .tooManyIPs(let count):
            "\(count) node IPs named: at most \(JoinRefusal.maxNodeIPs)"
        }
    }
}
