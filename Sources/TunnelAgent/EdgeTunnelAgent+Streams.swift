import Dispatch
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
            mux.rejectStream(streamID, code: 400, reason: "target \"\(PeerText.bounded(open.target))\" is not host:port")
            return
        }
        guard configuration.allowList.allows(host: target.host, port: target.port) else {
            metrics.refused.increment()
            logger.warning("refused stream to \(target): not on the allow list")
            mux.rejectStream(streamID, code: 403, reason: "\(target) is not on the allow list of node \(configuration.nodeName)")
            return
        }
        let loop = mux.eventLoop
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(configuration.dialTimeout)
            .streamConnection(halfClosure: true)
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
            connected = Self.resolve(target, on: loop, timeout: configuration.dialTimeout).flatMap { address in
                guard let ip = address.ipAddress.flatMap(IPAddress.init), allowList.allowsResolved(ip, port: target.port) else {
                    return loop.makeFailedFuture(ResolvedOutsideAllowList(address: address.ipAddress ?? "\(address)"))
                }
                return bootstrap.connect(to: address)
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
                    self.logger.warning("refused stream to \(target): the name resolved to \(refused.address), which no address rule allows")
                    mux.rejectStream(streamID, code: 403, reason: "\(target.host) resolved to \(refused.address), which the allow list of node "
                        + "\(self.configuration.nodeName) does not allow by address")
                case .failure(let error):
                    let (code, reason) = Self.classify(error, target: target)
                    self.metrics.dialFailed(reason: code == 504 ? "timeout" : "unreachable")
                    self.logger.info("cannot reach \(target): \(reason)")
                    mux.rejectStream(streamID, code: code, reason: reason)
                }
            }
    }

    /// A name target's address: getaddrinfo's first (RFC 6724-preferred) answer, resolved off the event loop
    /// (NIOPosix's own resolver, used by `connect(host:port:)`, is internal to it), or a timeout after `timeout`.
    static func resolve(_ target: HostPort, on loop: EventLoop, timeout: TimeAmount) -> EventLoopFuture<SocketAddress> {
        let promise = loop.makePromise(of: SocketAddress.self)
        let deadline = loop.scheduleTask(in: timeout) { promise.fail(ChannelError.connectTimeout(timeout)) }
        let host = target.host, port = target.port
        DispatchQueue.global().async {
            let result = Result { try SocketAddress.makeAddressResolvingHost(host, port: port) }
            loop.execute {
                deadline.cancel()
                promise.completeWith(result)
            }
        }
        return promise.futureResult
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
        if error is SocketAddressError.UnknownHost {
            return (502, "\(target.host) cannot be resolved")
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
            if connect.connectionErrors.contains(where: { if case ChannelError.connectTimeout = $0.error { true } else { false } }) {
                return (504, "\(target) did not answer in time")
            }
            if connect.dnsAError != nil || connect.dnsAAAAError != nil, connect.connectionErrors.isEmpty {
                return (502, "\(target.host) cannot be resolved")
            }
        }
        return (502, "\(target) is unreachable: \(error)")
    }
}

/// A name target resolved to an address the allow list does not allow by address (see ``AllowList/allowsResolved(_:port:)``).
struct ResolvedOutsideAllowList: Error {
    let address: String
}
