import NIOCore

/// Which replica a tunnel connection reached, told before TLS: an agent that already holds a tunnel to that
/// replica closes at once, having cost the server one accept and a line instead of a TLS handshake and a HELLO.
///
/// The agent opens with ``question`` (`ETREPLICA?\n`; a TLS connection begins with the byte 0x16, so the two never
/// meet). The server answers `ETREPLICA <server ID> pace=<ms>\n` and the connection goes on with TLS. The server ID
/// is a hint: the registration's ``HelloOK/serverID``, inside TLS, is what counts.
///
/// `pace` is how long the server asks an agent that reached a replica it already holds to wait before its next
/// probe. The server sizes it to the agents it holds, so that the whole fleet's probes stay near a rate it
/// chooses: 20 agents find a returned replica within seconds, and 10,000 do not flood it (docs/benchmarks.md).
public enum ReplicaProbe {
    public static let question: [UInt8] = Array("ETREPLICA?\n".utf8)
    static let answerPrefix = "ETREPLICA "
    /// The longest answer line accepted (a server ID is a pod name: at most 253 characters).
    static let maxAnswer = 300
    /// The pace an agent accepts from a server: anything outside is clamped (a broken or hostile server must
    /// neither make agents probe in a busy loop nor stop them looking for a replica).
    public static let paceRange: ClosedRange<Int64> = 250...300_000

    /// What a server answered.
    public struct Answer: Equatable, Sendable {
        public var serverID: String
        /// Milliseconds to wait before probing again when this replica is already held; nil from a server that
        /// does not say (the agent then backs off on its own).
        public var paceMilliseconds: Int64?

        public init(serverID: String, paceMilliseconds: Int64? = nil) {
            self.serverID = serverID
            self.paceMilliseconds = paceMilliseconds
        }
    }

    /// The answer line for `serverID`, asking duplicate probes to wait `pace`.
    public static func answer(serverID: String, pace: TimeAmount) -> String {
        answerPrefix + serverID + " pace=" + String(pace.nanoseconds / 1_000_000) + "\n"
    }

    /// The answer in `line` (without its newline), or nil if it is not one. The pace is clamped to ``paceRange``.
    static func answer(in line: String) -> Answer? {
        guard line.hasPrefix(answerPrefix) else { return nil }
        // `<server ID>` or `<server ID> pace=<ms>`; a server ID has no space (a pod name).
        let fields = line.dropFirst(answerPrefix.count).split(separator: " ", omittingEmptySubsequences: false)
        guard let id = fields.first, !id.isEmpty, fields.count <= 2 else { return nil }
        var pace: Int64?
        if fields.count == 2 {
            guard fields[1].hasPrefix("pace="), let milliseconds = Int64(fields[1].dropFirst(5)) else { return nil }
            pace = min(max(milliseconds, paceRange.lowerBound), paceRange.upperBound)
        }
        return Answer(serverID: String(id), paceMilliseconds: pace)
    }
}

/// Server side, at the head of the tunnel port's pipeline (after the connection gate, before TLS): answers a
/// ``ReplicaProbe`` question and leaves, or leaves at once when the first byte is not the question's.
public final class ReplicaProbeResponder: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer
    private let serverID: String
    private let pace: @Sendable () -> TimeAmount
    private var buffered: ByteBuffer?

    /// `pace`: asked once per question, how long an agent that already holds this replica should wait before
    /// probing again (``ReplicaProbePacer``).
    public init(serverID: String, pace: @escaping @Sendable () -> TimeAmount) {
        self.serverID = serverID
        self.pace = pace
    }

    /// Always the same `pace`.
    public convenience init(serverID: String, pace: TimeAmount) {
        self.init(serverID: serverID, pace: { pace })
    }

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
        context.writeAndFlush(
            NIOAny(context.channel.allocator.buffer(string: ReplicaProbe.answer(serverID: serverID, pace: pace()))),
            promise: nil)
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
/// reads the answer line, completes `answered` with it and leaves (or fails it: no answer, or not
/// one). The caller then adds TLS to the connection, or closes it.
public final class ReplicaProbeAsker: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    private let answered: EventLoopPromise<ReplicaProbe.Answer>
    private var line: [UInt8] = []
    private var done = false

    public init(answered: EventLoopPromise<ReplicaProbe.Answer>) { self.answered = answered }

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
                guard let answer = ReplicaProbe.answer(in: String(decoding: line, as: UTF8.self)) else {
                    finish(
                        .failure(
                            ReplicaProbeError(description: "the server's answer to the replica question is malformed")))
                    return
                }
                finish(.success(answer))
                context.pipeline.syncOperations.removeHandler(context: context, promise: nil)  // TLS comes next
                return
            }
            line.append(byte)
            if line.count > ReplicaProbe.maxAnswer {
                finish(
                    .failure(ReplicaProbeError(description: "the server's answer to the replica question is too long")))
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

    private func finish(_ result: Result<ReplicaProbe.Answer, Error>) {
        guard !done else { return }
        done = true
        answered.completeWith(result)
    }
}

public struct ReplicaProbeError: Error, CustomStringConvertible {
    public let description: String
    public init(description: String) { self.description = description }
}
