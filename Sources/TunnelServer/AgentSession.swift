import Foundation
import Logging
import NIOCore
import TunnelPKI
import TunnelSupport
import TunnelWire
import X509

/// The server's side of one agent's tunnel connection: registration (HELLO, in `AgentSession+Hello.swift`),
/// keepalive, certificate renewal.
///
/// Lives on the tunnel channel's event loop. The node name is the agent certificate's CN; the agent's HELLO
/// must claim the same name, and its node IPs must not be held by another connected node.
public final class AgentSession: TunnelMuxDelegate, @unchecked Sendable {
    public let nodeName: String
    public internal(set) var nodeIPs: [String] = []
    /// The pool the agent declared at HELLO (a DNS label), if any. With Node objects the Node's label counts
    /// instead (``TunnelServerCore/pool(of:)``).
    public internal(set) var declaredPool: String?
    /// How the agent says this connection reaches the server (HELLO's `path`); nil: it did not say, or in words
    /// this build does not know.
    public internal(set) var path: TunnelPath?
    public let remoteAddress: String
    public let connectedSince = Date()
    public let mux: TunnelMux
    /// The node IPs the certificate names (IP SANs): the only ones HELLO may claim, and kept at renewal.
    let certificateIPs: [IPAddress]
    /// When the certificate became valid: a reset or revocation after it voids the certificate.
    let certificateValidFrom: Date
    let channel: Channel
    // Internal rather than private from here on, with the HELLO-set properties' setters above, only for the
    // registration in AgentSession+Hello.swift. All of it is touched on the tunnel's loop only.
    let server: TunnelServerCore
    let logger: Logger
    /// Where the connection is in its life. Only `awaitingHello` is closed for not registering: a draining
    /// agent (its own GOAWAY) keeps its open streams for their drain. A `refused` connection was told why and
    /// is closing: nothing it sends after that is acted on or logged (a peer repeating a refused HELLO in one
    /// write got one log line per copy).
    enum State {
        case awaitingHello
        case registered
        case draining
        case refused
        /// The connection was lost; the streams wait for the agent to resume them (``resumeToken``).
        case suspended
        case closed
    }

    /// The token of this tunnel's streams, given to the agent in HELLO_OK: the agent names it in the HELLO of a
    /// later connection to resume them. Written once, before the session is registered. Nil: not resumable.
    var resumeToken: String?

    var state = State.awaitingHello
    private var keepalive: RepeatedTask?
    /// When this connection last asked for a renewal: at most one per ``renewalInterval`` is signed.
    private var lastRenewal: NIODeadline?
    /// When an early renewal was last logged: the rest of that interval's early renewals are only counted.
    private var lastEarlyRenewalLogged: NIODeadline?
    static let renewalInterval: TimeAmount = .seconds(10)

    init(nodeName: String, certificate: Certificate, channel: Channel, mux: TunnelMux, server: TunnelServerCore) {
        self.nodeName = nodeName
        self.certificateIPs = (try? CertificateSummary.sans(of: certificate).ipAddresses) ?? []
        self.certificateValidFrom = certificate.notValidBefore
        self.channel = channel
        self.mux = mux
        self.server = server
        self.remoteAddress = channel.remoteAddress.map(Self.format) ?? "unknown"
        var logger = server.logger
        logger[metadataKey: "node"] = "\(nodeName)"
        logger[metadataKey: "remote"] = "\(remoteAddress)"
        self.logger = logger
    }

    /// `ip:port`, IPv6 in brackets.
    static func format(_ address: SocketAddress) -> String {
        guard let ip = address.ipAddress, let port = address.port else { return address.description }
        return ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    }

    /// Streams open on this tunnel (read from any thread).
    public var streamCount: Int { mux.counters.snapshot.streams }

    func start() {
        server.registry.track(self)
        let interval = server.configuration.keepaliveInterval
        let deadAfter = server.configuration.keepaliveTimeout
        // A connection that never says HELLO, or goes silent, is closed; only a quiet tunnel is pinged.
        var rule = Keepalive(interval: interval, deadAfter: deadAfter, pingOnlyWhenQuiet: true)
        keepalive = channel.eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { [weak self] _ in
            guard let self else { return }
            let action = rule.check(now: .now(), lastFrame: self.mux.lastFrameReceived)
            if action == .dead {
                self.logger.warning("agent silent for \(deadAfter.seconds)s, closing its tunnel")
                // From under TLS: a dead peer never answers a close_notify, and its streams suspend only once
                // the connection is closed.
                StreamGlue.closeFromHead(self.channel)
            } else if case .awaitingHello = self.state {
                self.logger.warning("agent did not register within \(interval.seconds)s, closing")
                self.channel.close(promise: nil)
            } else if action == .ping {
                self.mux.ping()
            }
        }
    }

    public func mux(_ mux: TunnelMux, didReceiveOpen open: Open, streamID: UInt32) {
        // The mux refuses OPEN from agents itself (role .server); nothing to do.
    }

    public func mux(_ mux: TunnelMux, didReceiveControl frame: Frame) {
        switch frame.type {
        case .hello:
            handleHello(frame)
        case .renew:
            handleRenew(frame)
        case .goaway:
            // Before HELLO there is nothing to drain: the registration deadline still applies.
            guard case .registered = state else { return }
            logger.info("agent is draining: no new streams to it")
            mux.markDraining()
            mux.closeWithoutResume()  // the agent is leaving on purpose: what outlives the drain ends with it
            server.registry.unregister(self)
            state = .draining
            // Closed once its streams are done: a drained connection must not outlive them (HELLO then GOAWAY
            // would otherwise hold a connection outside every registration limit for as long as it answers PINGs).
            mux.whenIdle().whenComplete { _ in self.channel.close(promise: nil) }
        case .refused:
            // The sender closes after a REFUSED (PROTOCOL.md): logged once, then the connection closes.
            guard case .registered = state else { return }
            let reason = (try? Refused(frame: frame).reason).map { PeerText.bounded($0) } ?? "unknown"
            logger.warning("agent closed the tunnel: \(reason)")
            state = .refused
            mux.closeWithoutResume()
            channel.close(promise: nil)
        default:
            break
        }
    }

    public func muxDidClose(_ mux: TunnelMux) {
        keepalive?.cancel()
        server.registry.untrack(self)
        server.registry.unregister(self)
        server.registry.forgetSuspended(self)
        let counters = mux.counters.snapshot
        server.registry.retire(bytesIn: counters.bytesIn, bytesOut: counters.bytesOut)
        switch state {
        case .registered:
            logger.info("agent disconnected")
        case .suspended where mux.wasTakenOver:
            logger.info("the agent's suspended streams moved to its new connection")
        case .suspended:
            server.metrics.resumes.increment("ended")
            logger.info("the agent's suspended streams ended: not resumed in time, or not resumable")
        default:
            break
        }
        state = .closed
    }

    /// The connection was lost with streams open: they wait, for the grace period, for the agent to come back
    /// with this session's token. The node is not routable meanwhile (new requests get 502).
    public func muxDidSuspend(_ mux: TunnelMux) {
        keepalive?.cancel()
        server.registry.unregister(self)
        let wasRegistered: Bool
        if case .registered = state { wasRegistered = true } else { wasRegistered = false }
        state = .suspended
        if let replaced = server.registry.suspend(self) { replaced.abandonSuspended() }
        if wasRegistered {
            logger.info(
                "agent connection lost: its \(mux.streamCount) streams wait \(server.configuration.resumeGrace.seconds)s for it to resume them"
            )
        }
    }

    public func muxStreamWillNotResume(_ mux: TunnelMux) {
        server.metrics.unresumableStreams.increment()
    }

    /// Ends this session's suspended streams now.
    func abandonSuspended() {
        server.registry.forgetSuspended(self)
        mux.abandonSuspended()
    }

    /// Whether the agent's HELLO names this session's token (compared in constant time).
    func holdsResumeToken(in tokens: [String]) -> Bool {
        guard let resumeToken else { return false }
        let mine = Array(resumeToken.utf8)
        return tokens.contains { Array($0.utf8).equalsInConstantTime(mine) }
    }

    /// The agent came back with this session's token before this side found the old connection dead: close it
    /// from under TLS, so that its streams suspend, ready to be taken over.
    func loseConnectionForResume() -> EventLoopFuture<Void> {
        channel.eventLoop.submit {
            if case .suspended = self.state { return }
            StreamGlue.closeFromHead(self.channel)
        }.flatMap { self.channel.closeFuture }
    }

    /// No new streams on this connection (a newer one of the same node took over, e.g. after a path
    /// switch): tell the agent, and close once its open streams have finished — however long a
    /// `kubectl logs -f` on it runs; keepalive still closes it if the path dies.
    func retire(reason: String) {
        logger.info("\(reason): draining the old connection")
        mux.drain(reason: reason)
        mux.whenIdle().whenComplete { _ in self.channel.close(promise: nil) }
    }

    func refuse(_ reason: String) {
        logger.warning("registration refused: \(reason)")
        tellAndClose(Refused(reason: reason))
    }

    /// Sends `refused` and closes 200 ms later; from now on nothing the peer sends is acted on.
    func tellAndClose(_ refused: Refused) {
        state = .refused
        mux.closeWithoutResume()
        mux.sendControl(refused)
        channel.eventLoop.scheduleTask(in: .milliseconds(200)) { self.channel.close(promise: nil) }
    }

    /// The node lost its right to a tunnel (revoked, or reset by an operator): told why, then closed.
    func cutOff(reason: String) {
        guard channel.eventLoop.inEventLoop else {
            channel.eventLoop.execute { self.cutOff(reason: reason) }
            return
        }
        if case .suspended = state {
            logger.warning("\(reason): ending its suspended streams")
            abandonSuspended()
            return
        }
        logger.warning("\(reason): closing its tunnel")
        tellAndClose(Refused(reason: reason))
    }

    private func handleRenew(_ frame: Frame) {
        switch state {
        case .registered, .draining:
            break
        case .awaitingHello:
            refuse("RENEW before HELLO: register first")
            return
        case .refused, .suspended, .closed:
            return
        }
        let now = NIODeadline.now()
        if let last = lastRenewal, now - last < Self.renewalInterval {
            server.metrics.limitHits.increment("renew_rate")
            // An agent asks at most every 30 s: more is a broken or hostile peer, logged once an interval.
            if lastEarlyRenewalLogged.map({ now - $0 >= Self.renewalInterval }) ?? true {
                lastEarlyRenewalLogged = now
                let interval = Self.renewalInterval.seconds
                logger.warning(
                    "certificate renewal refused: asked again within \(interval)s (more within \(interval)s are only counted)"
                )
            }
            return
        }
        lastRenewal = now
        if let refusal = server.renewals.admit(
            node: nodeName, source: channel.remoteAddress?.ipAddress ?? "local", now: now)
        {
            server.metrics.limitHits.increment("renew_rate")
            logger.warning("certificate renewal refused: \(refusal)")
            return
        }
        do {
            try server.identities.reloadIfChanged()  // a stat: a revocation a moment ago counts
            guard server.identities.accepts(node: nodeName, certificateValidFrom: certificateValidFrom) else {
                throw RenewalRefused(description: "node \(nodeName) is revoked or was reset")
            }
            let request = try RenewRequest(frame: frame)
            let certificate = try server.authority().signNodeCSR(
                request.csrPEM, nodeName: nodeName, ips: certificateIPs,
                validity: server.configuration.agentCertificateValidity)
            mux.sendControl(RenewOK(certificatePEM: try PEMFiles.pem(certificate)))
            logger.info(
                "renewed the agent's certificate",
                metadata: [
                    "notAfter": "\(Timestamps.iso8601(certificate.notValidAfter))"
                ])
        } catch {
            // The agent keeps its current certificate and asks again later; the node's slot was not used.
            server.renewals.signedNothing(node: nodeName, admittedAt: now)
            logger.warning("certificate renewal refused: \(error)")
        }
    }
}

extension TimeAmount {
    var seconds: Int64 { nanoseconds / 1_000_000_000 }
}

struct RenewalRefused: Error, CustomStringConvertible {
    let description: String
}
