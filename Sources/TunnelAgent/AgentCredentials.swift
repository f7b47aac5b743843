import Crypto
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import TunnelPKI
import TunnelSupport
import TunnelWire
import X509

/// The agent's identity: its node certificate and key, and the tunnel CA, kept in the agent's PKI folder.
public struct AgentCredentials: Sendable {
    public let certificate: Certificate
    public let privateKey: Certificate.PrivateKey
    public let ca: Certificate

    public init(certificate: Certificate, privateKey: Certificate.PrivateKey, ca: Certificate) {
        self.certificate = certificate
        self.privateKey = privateKey
        self.ca = ca
    }

    /// Reads existing credentials, checking that they belong together, name this node, and are valid.
    public static func load(paths: PKIPaths, nodeName: String, now: Date = Date()) throws -> AgentCredentials {
        let ca = try PEMFiles.certificate(at: paths.caCertificate)
        try CertificateAuthority.checkIsCA(ca, path: paths.caCertificate)
        let (certificate, key) = try PEMFiles.keyPair(certificate: paths.agentCertificate, key: paths.agentKey)
        try PEMFiles.checkValidity(certificate, path: paths.agentCertificate, now: now)
        guard certificate.subject.commonName == nodeName else {
            throw ConfigurationError(
                "\(paths.agentCertificate): certificate is for node \(certificate.subject.commonName ?? "?"), not \(nodeName)"
            )
        }
        guard ca.publicKey.isValidSignature(certificate.signature, for: certificate) else {
            throw ConfigurationError("\(paths.agentCertificate): not signed by the CA in \(paths.caCertificate)")
        }
        return AgentCredentials(certificate: certificate, privateKey: key, ca: ca)
    }

    /// Writes key, certificate and CA atomically into the agent's PKI folder.
    func write(to paths: PKIPaths) throws {
        try AtomicFile.makeDirectory(paths.directory, mode: 0o700)
        try AtomicFile.write(Array(try PEMFiles.pem(ca).utf8), to: paths.caCertificate, mode: 0o644)
        try IssuedCredential(certificate: certificate, privateKey: privateKey)
            .write(certificatePath: paths.agentCertificate, keyPath: paths.agentKey)
    }

    /// When to ask for a new certificate (``X509/Certificate/renewalTime``).
    var renewalTime: Date { certificate.renewalTime }

    /// A CSR for this node with a fresh key.
    static func makeCSR(nodeName: String) throws -> (csrPEM: String, key: Certificate.PrivateKey) {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let csr = try CertificateSigningRequest(
            version: .v1,
            subject: try DistinguishedName {
                OrganizationName(CertificateAuthority.agentOrganization)
                CommonName(nodeName)
            },
            privateKey: key, attributes: .init(), signatureAlgorithm: .ecdsaWithSHA256)
        return (try csr.serializeAsPEM().pemString, key)
    }
}

/// Why a join failed, in one line.
public struct JoinError: Error, CustomStringConvertible {
    public let description: String
}

/// The bootstrap join: first contact with a server, with a token and a CSR, answered with the node's
/// certificate and the CA. The server's certificate cannot be verified before the CA is known, so the agent
/// pins the CA by hash (`--ca-cert-hash`, as `kubeadm join`) and checks afterwards that the CA matches the pin
/// and that the server's certificate was signed by it.
enum JoinClient {
    static func join(
        address: ServerAddress, token: String, caCertHash: String, nodeName: String, nodeIPs: [IPAddress],
        group: EventLoopGroup,
        timeout: TimeAmount, logger: Logger
    ) async throws -> AgentCredentials {
        let pin = try CAHash.validate(caCertHash)
        _ = try BootstrapToken(parsing: token)
        let (csrPEM, key) = try AgentCredentials.makeCSR(nodeName: nodeName)
        let context = try TLSContexts.joinClient()
        let request = JoinRequest(token: token, nodeName: nodeName, nodeIPs: nodeIPs.map(\.description), csrPEM: csrPEM)
        // The connect and the handshake within `timeout`, then the answer within `timeout`.
        let channel = try await TLSClient.connect(
            host: address.host, port: address.port, on: group.next(), context: context, serverHostname: nil,
            within: timeout)
        let handler = JoinClientHandler(request: request, eventLoop: channel.eventLoop)
        do {
            try await channel.eventLoop.submit {
                let sync = channel.pipeline.syncOperations
                try sync.addHandler(FrameDecoder(maxPayload: Frame.maxUnregisteredPayload))
                try sync.addHandler(FrameEncoder())
                try sync.addHandler(handler)
            }.get()
        } catch {
            channel.close(promise: nil)
            handler.promise.complete(.failure(error))
            throw error
        }
        let scheduled = channel.eventLoop.scheduleTask(in: timeout) {
            handler.fail(channel: channel, JoinError(description: "join with \(address) timed out"))
        }
        defer { scheduled.cancel() }
        let (reply, serverCertificate) = try await handler.result.get()
        channel.close(promise: nil)

        let ca: Certificate
        let certificate: Certificate
        do {
            ca = try Certificate(pemEncoded: reply.caPEM)
            certificate = try Certificate(pemEncoded: reply.certificatePEM)
        } catch {
            throw JoinError(description: "server \(address) sent an unreadable certificate")
        }
        guard try CAHash.of(ca) == pin else {
            throw JoinError(description: "CA of server \(address) has hash \(try CAHash.of(ca)), not the pinned \(pin)")
        }
        guard ca.publicKey.isValidSignature(serverCertificate.signature, for: serverCertificate),
            (try? serverCertificate.extensions.extendedKeyUsage?.contains(.serverAuth)) == true
        else {
            throw JoinError(description: "server \(address) presented a certificate not issued by the pinned CA")
        }
        guard ca.publicKey.isValidSignature(certificate.signature, for: certificate),
            certificate.publicKey == key.publicKey, certificate.subject.commonName == nodeName
        else {
            throw JoinError(description: "server \(address) returned a certificate that is not ours")
        }
        logger.info("joined", metadata: ["server": "\(address)", "node": "\(nodeName)"])
        return AgentCredentials(certificate: certificate, privateKey: key, ca: ca)
    }
}

/// Sendable because the join code hands it to the channel initializer and to the timeout task: everything it does
/// off the channel's loop goes through the locked promise or hops onto the loop first (``fail(channel:_:)``).
final class JoinClientHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = Frame
    typealias OutboundOut = Frame

    private let request: JoinRequest
    let promise: NIOLockedPromise
    var result: EventLoopFuture<(JoinOK, Certificate)> { promise.future }

    /// A promise that may be completed from the timeout, from the channel or from the failed connect, whichever
    /// is first; the others are ignored (completing a NIO promise twice traps).
    final class NIOLockedPromise: @unchecked Sendable {
        let promise: EventLoopPromise<(JoinOK, Certificate)>
        var future: EventLoopFuture<(JoinOK, Certificate)> { promise.futureResult }
        private let lock = NIOLock()
        private var done = false
        init(_ promise: EventLoopPromise<(JoinOK, Certificate)>) { self.promise = promise }
        func complete(_ result: Result<(JoinOK, Certificate), Error>) {
            let first = lock.withLock {
                defer { done = true }
                return !done
            }
            if first { promise.completeWith(result) }
        }
    }

    private var serverCertificate: Certificate?

    init(request: JoinRequest, eventLoop: EventLoop) {
        self.request = request
        self.promise = NIOLockedPromise(eventLoop.makePromise())
    }

    func fail(channel: Channel, _ error: Error) {
        channel.eventLoop.execute {
            self.promise.complete(.failure(error))
            channel.close(promise: nil)
        }
    }

    /// Added once the TLS handshake completed (``TLSClient``): the server's certificate is known, the request goes.
    func handlerAdded(context: ChannelHandlerContext) {
        serverCertificate = try? context.pipeline.syncOperations.nioSSL_peerCertificate()?.x509()
        context.writeAndFlush(wrapOutboundOut(request.frame(allocator: context.channel.allocator)), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.type {
        case .joinOK:
            guard let ok = try? JoinOK(frame: frame), let serverCertificate else {
                promise.complete(.failure(JoinError(description: "malformed join answer")))
                return
            }
            promise.complete(.success((ok, serverCertificate)))
        case .refused:
            let reason = (try? Refused(frame: frame).reason).map { PeerText.bounded($0) } ?? "no reason given"
            promise.complete(.failure(JoinError(description: "server refused the join: \(reason)")))
        default:
            break
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.complete(.failure(JoinError(description: "server closed the connection before answering the join")))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.complete(.failure(JoinError(description: "join connection failed: \(error)")))
        context.close(promise: nil)
    }
}
