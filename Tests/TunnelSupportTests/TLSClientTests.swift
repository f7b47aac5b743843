import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import Testing
import TunnelPKI

@testable import TunnelSupport

/// The one outbound TLS shape: connect and handshake by one deadline, against real sockets and a real TLS server.
@Suite struct TLSClientTests {
    static let group = MultiThreadedEventLoopGroup.singleton

    /// A listener on 127.0.0.1 whose accepted connections get `handlers` (none: a peer that never answers).
    static func listen(_ handlers: @escaping @Sendable (Channel) throws -> Void = { _ in }) async throws -> Channel {
        try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in channel.eventLoop.makeCompletedFuture { try handlers(channel) } }
            .bind(host: "127.0.0.1", port: 0).get()
    }

    static func port(_ channel: Channel) -> Int { channel.localAddress?.port ?? 0 }

    /// A CA, a server context with a certificate for 127.0.0.1 issued by it, and a client context trusting it.
    static func contexts() throws -> (server: NIOSSLContext, client: NIOSSLContext) {
        let ca = try CertificateAuthority.create()
        let issued = try ca.issueServerCertificate(sans: ServerSANs(ips: [], dnsNames: []))
        let server = try NIOSSLContext(
            configuration: .makeServerConfiguration(
                certificateChain: [.certificate(try TLSContexts.nioCertificate(issued.certificate))],
                privateKey: .privateKey(try TLSContexts.nioKey(issued.privateKey))))
        var client = TLSConfiguration.makeClientConfiguration()
        client.trustRoots = .certificates([try TLSContexts.nioCertificate(ca.certificate)])
        return (server, try NIOSSLContext(configuration: client))
    }

    @Test func aPeerThatAcceptsAndNeverAnswersCostsNoMoreThanTheDeadlineAndIsClosed() async throws {
        let closed = NIOLockedValueBox(0)
        let listener = try await Self.listen { channel in
            channel.closeFuture.whenComplete { _ in closed.withLockedValue { $0 += 1 } }
        }
        defer { listener.close(promise: nil) }
        let (_, client) = try Self.contexts()
        let started = NIODeadline.now()
        await #expect(throws: TLSClient.HandshakeTimedOut.self) {
            _ = try await TLSClient.connect(
                host: "127.0.0.1", port: Self.port(listener), on: Self.group.next(), context: client,
                serverHostname: nil, within: .milliseconds(300))
        }
        let waited = NIODeadline.now() - started
        // Bounded by the deadline, not by the peer (which never answers); the upper bound leaves room for a CI run
        // whose parallel suite starved the loops for seconds (3 s was missed once).
        #expect(waited >= .milliseconds(300) && waited < .seconds(30), "waited \(waited)")
        // The client closed its side: the silent server sees the connection end.
        let seen = ContinuousClock.now + .seconds(20)
        while closed.withLockedValue({ $0 }) == 0, ContinuousClock.now < seen {
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(closed.withLockedValue { $0 } == 1)
        #expect(
            "\(TLSClient.HandshakeTimedOut(timeout: .milliseconds(300)))"
                == "the TLS handshake did not complete within 0.3 s")
    }

    @Test func aCompletedHandshakeLeavesOnlyTheTLSHandlerAndCarriesBytes() async throws {
        let (server, client) = try Self.contexts()
        let listener = try await Self.listen { channel in
            try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: server))
            try channel.pipeline.syncOperations.addHandler(Echo())
        }
        defer { listener.close(promise: nil) }
        let channel = try await TLSClient.connect(
            host: "127.0.0.1", port: Self.port(listener), on: Self.group.next(), context: client,
            serverHostname: nil, within: .seconds(30))
        defer { channel.close(promise: nil) }
        let received = channel.eventLoop.makePromise(of: String.self)
        try await channel.eventLoop.submit {
            let sync = channel.pipeline.syncOperations
            #expect(throws: Never.self) { _ = try sync.handler(type: NIOSSLClientHandler.self) }
            #expect(throws: (any Error).self) { _ = try sync.handler(type: HandshakeWaiter.self) }
            try sync.addHandler(Collect(promise: received))
        }.get()
        try await channel.writeAndFlush(ByteBuffer(string: "ping")).get()
        #expect(try await received.futureResult.get() == "ping")
    }

    @Test func aCertificateTheClientDoesNotTrustFailsTheConnect() async throws {
        let (server, _) = try Self.contexts()
        let (_, otherClient) = try Self.contexts()  // trusts another CA
        let listener = try await Self.listen { channel in
            try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: server))
        }
        defer { listener.close(promise: nil) }
        await #expect(throws: NIOSSLError.self) {
            _ = try await TLSClient.connect(
                host: "127.0.0.1", port: Self.port(listener), on: Self.group.next(), context: otherClient,
                serverHostname: nil, within: .seconds(30))
        }
    }

    @Test func nothingListeningFailsAtOnce() async throws {
        let listener = try await Self.listen()
        let port = Self.port(listener)
        try await listener.close()
        let (_, client) = try Self.contexts()
        // Refused by the kernel, not given up on at the deadline (no timed bound: a busy machine took 2.4 s once).
        let error = await #expect(throws: (any Error).self) {
            _ = try await TLSClient.connect(
                host: "127.0.0.1", port: port, on: Self.group.next(), context: client, serverHostname: nil,
                within: .seconds(60))
        }
        #expect(!(error is TLSClient.HandshakeTimedOut) && !(error is ChannelError), "\(String(describing: error))")
        #expect(String(describing: error).contains("refused"), "\(String(describing: error))")
    }

    @Test func theServerNameIsTheHostUnlessItIsAnAddress() {
        #expect(TLSClient.serverName(for: "x-tunnel-server-svc.kube-system") == "x-tunnel-server-svc.kube-system")
        #expect(TLSClient.serverName(for: "10.0.0.1") == nil)
        #expect(TLSClient.serverName(for: "fd00::1") == nil)
    }
}

private final class Echo: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { context.writeAndFlush(data, promise: nil) }
}

private final class Collect: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let promise: EventLoopPromise<String>
    init(promise: EventLoopPromise<String>) { self.promise = promise }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        promise.succeed(String(buffer: unwrapInboundIn(data)))
    }
}
