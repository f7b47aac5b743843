import NIOCore
import NIOPosix
import NIOSSL
import TunnelPKI

/// Outbound TLS with a deadline: the TCP connect and the TLS handshake both finish by one deadline, or the
/// connection is closed and the caller gets an error. Every TLS client of EdgeTunnel that waits for a handshake
/// goes through here: the join, the agent's path probe, the Kubernetes API client, `doctor`, and TLS to a kubelet
/// inside a stream. A peer that accepts and then never answers costs a caller no more than its deadline.
public enum TLSClient {
    /// The handshake did not finish by its deadline.
    public struct HandshakeTimedOut: Error, CustomStringConvertible {
        public let timeout: TimeAmount
        public var description: String {
            "the TLS handshake did not complete within \(Double(timeout.nanoseconds) / 1e9) s"
        }
    }

    /// The name to send as SNI and check against the certificate's DNS names: `host` unless it is an IP
    /// address (an IP cannot be SNI; NIOSSL then checks the certificate's IP SANs against the address).
    public static func serverName(for host: String) -> String? {
        IPAddress(host) == nil ? host : nil
    }

    /// Connects to `host:port` on `loop` and completes the TLS handshake, both within `timeout`. The returned
    /// channel carries only the TLS handler: add the protocol's handlers after it.
    public static func connect(
        host: String, port: Int, on loop: EventLoop, context: NIOSSLContext, serverHostname: String?,
        within timeout: TimeAmount
    ) async throws -> Channel {
        let deadline = NIODeadline.now() + timeout
        let channel = try await ClientBootstrap(group: loop)
            .connectTimeout(timeout)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .connect(hostOrLiteral: host, port: port).get()
        do {
            try await handshake(
                on: channel, context: context, serverHostname: serverHostname, deadline: deadline,
                timeout: timeout
            ).get()
            return channel
        } catch {
            channel.close(promise: nil)
            throw error
        }
    }

    /// Adds a TLS client handler to a connected `channel` (a socket, or one end of a socket pair) and succeeds once
    /// its handshake completed, by `deadline`. On any failure the channel is closed.
    public static func handshake(
        on channel: Channel, context: NIOSSLContext, serverHostname: String?, deadline: NIODeadline,
        timeout: TimeAmount
    ) -> EventLoopFuture<Void> {
        let loop = channel.eventLoop
        let done = loop.makePromise(of: Void.self)
        let waiter = HandshakeWaiter(promise: done)
        let timer = loop.scheduleTask(deadline: deadline) { done.fail(HandshakeTimedOut(timeout: timeout)) }
        loop.execute {
            do {
                let sync = channel.pipeline.syncOperations
                try sync.addHandler(NIOSSLClientHandler(context: context, serverHostname: serverHostname))
                try sync.addHandler(waiter)
            } catch {
                done.fail(error)
            }
        }
        return done.futureResult.map {
            timer.cancel()
            channel.pipeline.syncOperations.removeHandler(waiter, promise: nil)
        }.flatMapErrorThrowing { error in
            timer.cancel()
            channel.close(promise: nil)
            throw error
        }
    }
}

extension ClientBootstrap {
    /// Connects to `host:port`. An IP literal is connected to directly; only a name goes through NIO's resolver and
    /// Happy Eyeballs, which cost a hop to a resolver thread (getaddrinfo) and two timers per dial. An agent probing
    /// a Service address for its replicas dials it every few seconds: a profile of 2,000 agents in one process spent
    /// 12% of its CPU resolving a literal.
    public func connect(hostOrLiteral host: String, port: Int) -> EventLoopFuture<Channel> {
        if let address = try? SocketAddress(ipAddress: host, port: port) {
            return connect(to: address)
        }
        return connect(host: host, port: port)
    }
}
