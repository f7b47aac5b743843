import NIOCore

/// Which replica a tunnel connection reached, told before TLS: an agent that already holds a tunnel to that
/// replica closes at once, having cost the server one accept and a line instead of a TLS handshake and a HELLO.
///
/// The agent opens with ``question`` (`ETREPLICA?\n`; a TLS connection begins with the byte 0x16, so the two never
/// meet). The server answers `ETREPLICA <server ID>\n` and the connection goes on with TLS. The server ID is a
/// hint: the registration's ``HelloOK/serverID``, inside TLS, is what counts.
public enum ReplicaProbe {
    public static let question: [UInt8] = Array("ETREPLICA?\n".utf8)
    static let answerPrefix = "ETREPLICA "
    /// The longest answer line accepted (a server ID is a pod name: at most 253 characters).
    static let maxAnswer = 300

    /// The answer line for `serverID`.
    public static func answer(serverID: String) -> String { answerPrefix + serverID + "\n" }

    /// The server ID in `line` (without its newline), or nil if it is not an answer.
    static func serverID(in line: String) -> String? {
        guard line.hasPrefix(answerPrefix) else { return nil }
        let id = String(line.dropFirst(answerPrefix.count))
        return id.isEmpty ? nil : id
    }
}

/// Server side, at the head of the tunnel port's pipeline (after the connection gate, before TLS): answers a
/// ``ReplicaProbe`` question and leaves, or leaves at once when the first byte is not the question's.
public final class ReplicaProbeResponder: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer
    private let serverID: String
    private var buffered: ByteBuffer?

    public init(serverID: String) { self.serverID = serverID }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if buffered == nil { buffered = incoming } else { buffered!.writeBuffer(&incoming) }
        let bytes = buffered!.readableBytesView
        let question = ReplicaProbe.question
        let compared = min(bytes.count, question.count)
        guard bytes.prefix(compared).elementsEqual(question.prefix(compared)) else {
            leave(context)  // not a question (TLS): pass everything on unchanged
            return
        }
        guard compared == question.count else { return }  // the question, not complete yet
        buffered!.moveReaderIndex(forwardBy: question.count)
        context.writeAndFlush(NIOAny(context.channel.allocator.buffer(string: ReplicaProbe.answer(serverID: serverID))), promise: nil)
        leave(context)
    }

    private func leave(_ context: ChannelHandlerContext) {
        if let rest = buffered, rest.readableBytes > 0 {
            context.fireChannelRead(wrapInboundOut(rest))
        }
        buffered = nil
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}

/// Agent side, the only handler of a new tunnel connection until the server said which replica it is: asks,
/// reads the answer line, completes `answered` with the server ID and leaves (or fails it: no answer, or not
/// one). The caller then adds TLS to the connection, or closes it.
public final class ReplicaProbeAsker: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    private let answered: EventLoopPromise<String>
    private var line: [UInt8] = []
    private var done = false

    public init(answered: EventLoopPromise<String>) { self.answered = answered }

    public func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(NIOAny(context.channel.allocator.buffer(bytes: ReplicaProbe.question)), promise: nil)
        context.fireChannelActive()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !done else { return }
        let incoming = unwrapInboundIn(data)
        for byte in incoming.readableBytesView {
            if byte == UInt8(ascii: "\n") {
                // The server writes nothing after its answer until our TLS ClientHello: nothing can follow it.
                guard let id = ReplicaProbe.serverID(in: String(decoding: line, as: UTF8.self)) else {
                    finish(.failure(ReplicaProbeError(description: "the server's answer to the replica question is malformed")))
                    return
                }
                finish(.success(id))
                context.pipeline.syncOperations.removeHandler(context: context, promise: nil)  // TLS comes next
                return
            }
            line.append(byte)
            if line.count > ReplicaProbe.maxAnswer {
                finish(.failure(ReplicaProbeError(description: "the server's answer to the replica question is too long")))
                return
            }
        }
    }

    public func channelInactive(context: ChannelHandlerContext) {
        finish(.failure(ReplicaProbeError(description: "the server closed before saying which replica it is")))
        context.fireChannelInactive()
    }

    public func errorCaught(context: ChannelHandlerContext, error: Error) {
        finish(.failure(error))
        context.close(promise: nil)
    }

    private func finish(_ result: Result<String, Error>) {
        guard !done else { return }
        done = true
        answered.completeWith(result)
    }
}

public struct ReplicaProbeError: Error, CustomStringConvertible {
    public let description: String
    public init(description: String) { self.description = description }
}
