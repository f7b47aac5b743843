import NIOCore
import TunnelPKI
import TunnelSupport
import TunnelWire

/// Registration: an agent's HELLO is checked (protocol version, revocation, the certificate's node name and IPs,
/// the Node object, its pool), then the session is registered, and with version 3 it may take over the streams
/// of the node's lost tunnel.
extension AgentSession {
    /// HELLO: the agent registers, or is refused and told why. On the tunnel's loop.
    func handleHello(_ frame: Frame) {
        guard case .awaitingHello = state else { return }
        let hello: Hello
        do {
            hello = try Hello(frame: frame)
        } catch {
            refuse("malformed HELLO")
            return
        }
        guard (oldestAgentProtocolVersion...tunnelProtocolVersion).contains(hello.version) else {
            let reason =
                "protocol version \(hello.version) is not supported (server speaks \(oldestAgentProtocolVersion) to \(tunnelProtocolVersion))"
            logger.warning("registration refused: \(reason)")
            tellAndClose(Refused(reason: reason, code: Refused.unsupportedVersion))
            return
        }
        // A revocation between this connection's handshake and its HELLO counts.
        _ = try? server.identities.reloadIfChanged()
        guard server.identities.isLoaded else {
            refuse("the server has not loaded its node records yet: try again")
            return
        }
        guard server.identities.accepts(node: nodeName, certificateValidFrom: certificateValidFrom) else {
            refuse("node \(nodeName) is revoked or was reset after this certificate was issued")
            return
        }
        guard hello.nodeName == nodeName else {
            refuse(
                "certificate is for node \(nodeName) but the registration claims node \(PeerText.bounded(hello.nodeName))"
            )
            return
        }
        if let have = hello.haveServers, have.contains(server.configuration.serverID) {
            // The agent holds a tunnel to this replica already (the Service picked it again): refused before
            // anything is registered, so the live tunnel stays.
            server.metrics.duplicateTunnels.increment()
            tellAndClose(
                Refused(reason: "already connected to server \(server.configuration.serverID)", duplicate: true))
            return
        }
        if let pool = hello.pool, !PoolName.isValid(pool) {
            refuse(
                "pool \"\(PeerText.bounded(pool, limit: 80))\" is not a DNS label (1-63 lower-case letters, digits and '-')"
            )
            return
        }
        // With Node objects: only an existing Node registers, claiming only addresses its Node reports.
        var nodeAddresses: [String]?
        if let directory = server.nodeDirectory {
            guard directory.isLoaded else {
                refuse("the server has not yet loaded the cluster's Node objects: try again in a moment")
                return
            }
            guard let reported = directory.addresses(of: nodeName) else {
                refuse("there is no Node object named \(nodeName) in the cluster")
                return
            }
            nodeAddresses = reported
        }
        var ips: [String] = []
        for ip in hello.nodeIPs {
            guard let address = IPAddress(ip) else {
                refuse("node IP \"\(PeerText.bounded(ip))\" is not an IP address")
                return
            }
            guard certificateIPs.contains(address) else {
                let issued = certificateIPs.isEmpty ? "none" : certificateIPs.map(\.description).joined(separator: ", ")
                refuse(
                    "node IP \(address) is not in the certificate of node \(nodeName) (its IPs: \(issued)); "
                        + "a node's IPs are fixed when it joins")
                return
            }
            if let nodeAddresses, !nodeAddresses.contains(where: { IPAddress($0) == address }) {
                refuse(
                    "node IP \(address) is not among the addresses of Node \(nodeName) (\(nodeAddresses.isEmpty ? "none" : nodeAddresses.joined(separator: ", ")))"
                )
                return
            }
            ips.append(address.description)
        }
        nodeIPs = ips
        declaredPool = hello.pool
        path = hello.path.flatMap(TunnelPath.init(rawValue:))
        if let declared = hello.pool, let directory = server.nodeDirectory, directory.pool(of: nodeName) != declared {
            // An agent cannot put its node into another pool: the Node's label counts.
            logger.warning(
                "the agent declares pool \(declared), but its Node's pool label says \(directory.pool(of: nodeName) ?? "none"): the Node's counts"
            )
        }
        // Version 3: this tunnel is resumable, and it may resume the streams of the node's lost one.
        var resumeFrom: AgentSession?
        let grace = server.configuration.resumeGrace
        if hello.version >= 3, grace > .zero {
            let found = server.registry.resumable(
                node: nodeName, tokens: Array((hello.resumeTokens ?? []).prefix(maxResumeTokens)))
            resumeFrom = found.match
            // A suspended tunnel the agent did not name: it restarted, and those streams are gone on its side.
            found.stale?.abandonSuspended()
            resumeToken = Self.newResumeToken()
            mux.enableResume(grace: grace)
            if resumeFrom != nil { mux.beginTakeOver() }
        }
        do {
            if let previous = try server.registry.register(self), previous !== resumeFrom {
                previous.retire(reason: "replaced by a new connection from the same node")
            }
        } catch {
            // A suspended tunnel taken out of the registry for this connection now ends with its grace period.
            refuse("\(error)")
            return
        }
        state = .registered
        // Out of the listener's gate only now: until HELLO it counts per source and in total, with its deadline.
        PendingConnectionHandler.authenticated(channel.pipeline.syncOperations)
        mux.peerRegistered()
        logger.info(
            "agent registered",
            metadata: [
                "ips": "\(ips.joined(separator: ","))", "pool": "\(server.pool(of: self) ?? "")",
                "path": "\(TunnelPath.shown(hello.path))",
            ])
        mux.sendControl(
            HelloOK(
                serverID: server.configuration.serverID,
                pingIntervalSeconds: Double(server.configuration.keepaliveInterval.nanoseconds) / 1e9,
                serverCount: server.serverCount,
                resumeToken: resumeToken,
                resumeGraceSeconds: resumeToken == nil ? nil : Double(grace.nanoseconds) / 1e9,
                resumed: resumeFrom == nil ? nil : true))
        guard let resumeFrom else { return }
        let logger = self.logger
        let metrics = server.metrics
        resumeFrom.loseConnectionForResume()
            .flatMap { self.mux.takeOver(resumeFrom.mux) }
            .whenComplete { result in
                switch result {
                case .success(let count?):
                    metrics.resumes.increment("resumed")
                    logger.info("resumed the agent's \(count) streams on its new connection")
                case .success(nil), .failure:
                    logger.warning("the agent's lost streams could not be resumed: they had ended")
                }
            }
    }

    /// 128 random bits (the system's cryptographic source) as 32 hex digits.
    static func newResumeToken() -> String {
        var generator = SystemRandomNumberGenerator()
        return (0..<16).map { _ in UInt8.random(in: 0...255, using: &generator) }.hexString
    }
}
