import NIOCore
import NIOPosix
import NIOSSL
import TunnelPKI
import TunnelSupport
import TunnelWire

/// Streams the server opens: the target resolved, checked against the allow list, dialed and relayed.
extension EdgeTunnelAgent {
    /// Maps a requested target to what the agent dials: its own node name and `localhost` mean loopback.
    func resolveTarget(_ target: String) -> HostPort? {
        guard var hostPort = HostPort(authority: target) else { return nil }
        if hostPort.host == configuration.nodeName.lowercased() || hostPort.host == "localhost" {
            hostPort.host = "127.0.0.1"
        }
        return hostPort
    }

    func open(_ open: Open, streamID: UInt32, mux: TunnelMux) {
        guard let target = resolveTarget(open.target) else {
            mux.rejectStream(
                streamID, code: 400, reason: "target \"\(PeerText.bounded(open.target))\" is not host:port")
            return
        }
        guard configuration.allowList.allows(host: target.host, port: target.port) else {
            metrics.refused.increment()
            logger.warning("refused stream to \(target): not on the allow list")
            mux.rejectStream(
                streamID, code: 403, reason: "\(target) is not on the allow list of node \(configuration.nodeName)")
            return
        }
        let loop = mux.eventLoop
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(configuration.dialTimeout)
            .streamConnection(halfClosure: true, oneStream: true)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        StreamGlue(mux: mux, streamID: streamID, eventLoop: channel.eventLoop))
                }
            }
        // An IP target is dialled directly. A name is resolved first and its address checked against the allow
        // list before any packet goes to it (DNS rebinding: a name rule must not lead to loopback or the metadata
        // address, and connecting first told a hostile server which of their ports were open).
        let allowList = configuration.allowList
        let connected: EventLoopFuture<Channel>
        if let address = try? SocketAddress(ipAddress: target.host, port: target.port) {
            connected = bootstrap.connect(to: address)
        } else {
            // One dial timeout covers the lookup and the connect.
            let deadline = NIODeadline.now() + configuration.dialTimeout
            connected = lookups.resolve(
                host: target.host, port: target.port, on: loop, timeout: configuration.dialTimeout
            )
            .flatMap { addresses in
                let allowed = addresses.filter { address in
                    address.ipAddress.flatMap(IPAddress.init).map { allowList.allowsResolved($0, port: target.port) }
                        ?? false
                }
                guard !allowed.isEmpty else {
                    return loop.makeFailedFuture(ResolvedOutsideAllowList(address: addresses.first?.ipAddress ?? "?"))
                }
                return bootstrap.connectTimeout(max(deadline - .now(), .milliseconds(1)))
                    .resolver(ResolvedAddresses(loop: loop, addresses: allowed))
                    .connect(host: target.host, port: target.port)
            }
        }
        connected
            .whenComplete { [weak self] result in
                guard let self else { return }
                switch result {
                case .success:
                    mux.acceptStream(streamID)
                case .failure(let refused as ResolvedOutsideAllowList):
                    self.metrics.refused.increment()
                    self.logger.warning(
                        "refused stream to \(target): the name resolved to \(refused.address), which no address rule allows"
                    )
                    mux.rejectStream(
                        streamID, code: 403,
                        reason: "\(target.host) resolved to \(refused.address), which the allow list of node "
                            + "\(self.configuration.nodeName) does not allow by address")
                case .failure(let error as ChannelError) where error == .ioOnClosedChannel:
                    // Closed while it was being made: the server reset the stream (its caller went away during the
                    // dial), and the glue closed the connection. No dial failed; the stream is already gone, so the
                    // rejection is a no-op then (it still answers if anything else closed the connection).
                    self.logger.debug("stream to \(target) cancelled during the dial")
                    mux.rejectStream(
                        streamID, code: 502,
                        reason: "\(target) is unreachable: the connection was closed as it was made")
                case .failure(let error):
                    let (code, reason) = Self.classify(error, target: target)
                    self.metrics.dialFailed(reason: code == 504 ? "timeout" : "unreachable")
                    self.logger.info("cannot reach \(target): \(reason)")
                    mux.rejectStream(streamID, code: code, reason: reason)
                }
            }
    }

    /// A connection failure in an operator's words.
    static func describe(_ error: Error, address: String) -> String {
        if let ssl = error as? NIOSSLExtraError, ssl == .failedToValidateHostname {
            return "its certificate does not name \(address): add the address to the server's certIPs or certDNSNames"
        }
        if case NIOSSLError.handshakeFailed = error {
            return "TLS handshake failed (\(error)): is it an EdgeTunnel server of this CA?"
        }
        if case ChannelError.connectTimeout = error {
            return "no answer within the connect timeout (black-holed or down)"
        }
        return "\(error)"
    }

    static func classify(_ error: Error, target: HostPort) -> (Int, String) {
        if error is NameNotResolved {
            return (502, "\(target.host) cannot be resolved")
        }
        if error is TooManyLookups {
            return (503, "too many name lookups are waiting on the node: try again")
        }
        if case ChannelError.connectTimeout = error {
            return (504, "\(target) did not answer in time")
        }
        if let io = error as? IOError, io.errnoCode == ECONNREFUSED {
            return (502, "\(target) refused the connection")
        }
        if let connect = error as? NIOConnectionError {
            if connect.connectionErrors.contains(where: { ($0.error as? IOError)?.errnoCode == ECONNREFUSED }) {
                return (502, "\(target) refused the connection")
            }
            if connect.connectionErrors.contains(where: {
                if case ChannelError.connectTimeout = $0.error { true } else { false }
            }) {
                return (504, "\(target) did not answer in time")
            }
            if connect.dnsAError != nil || connect.dnsAAAAError != nil, connect.connectionErrors.isEmpty {
                return (502, "\(target.host) cannot be resolved")
            }
        }
        return (502, "\(target) is unreachable: \(error)")
    }
}
