import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelWire

/// The line before TLS that tells an agent which replica the Service picked.
@Suite struct ReplicaProbeTests {
    func responder() throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(
            ReplicaProbeResponder(serverID: "replica-7", pace: .milliseconds(2500)))
        return channel
    }

    @Test func aQuestionInPiecesIsAnsweredAndWhatFollowsPassesOnUnchanged() throws {
        let channel = try responder()
        let question = ReplicaProbe.question
        try channel.writeInbound(ByteBuffer(bytes: question.prefix(4)))
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)  // not complete: no answer yet
        try channel.writeInbound(ByteBuffer(bytes: question.dropFirst(4) + [0x16, 0x03, 0x01]))
        #expect(
            try channel.readOutbound(as: ByteBuffer.self).map { String(buffer: $0) }
                == "ETREPLICA replica-7 pace=2500\n")
        #expect(try channel.readInbound(as: ByteBuffer.self) == ByteBuffer(bytes: [0x16, 0x03, 0x01]))
        try channel.writeInbound(ByteBuffer(bytes: question))  // the responder has left: a second one is data
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        #expect(try channel.readInbound(as: ByteBuffer.self) == ByteBuffer(bytes: question))
    }

    @Test func aTLSClientHelloIsNotTouched() throws {
        let channel = try responder()
        let hello: [UInt8] = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]
        try channel.writeInbound(ByteBuffer(bytes: hello))
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        #expect(try channel.readInbound(as: ByteBuffer.self) == ByteBuffer(bytes: hello))
    }

    func ask(_ answer: [UInt8]) throws -> Result<ReplicaProbe.Answer, Error> {
        let channel = EmbeddedChannel()
        let promise = channel.eventLoop.makePromise(of: ReplicaProbe.Answer.self)
        try channel.pipeline.syncOperations.addHandler(ReplicaProbeAsker(answered: promise))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        #expect(try channel.readOutbound(as: ByteBuffer.self) == ByteBuffer(bytes: ReplicaProbe.question))
        try channel.writeInbound(ByteBuffer(bytes: answer))
        if !answer.contains(UInt8(ascii: "\n")), answer.count <= 300 { _ = try? channel.close().wait() }
        var result: Result<ReplicaProbe.Answer, Error>?
        promise.futureResult.whenComplete { result = $0 }
        channel.embeddedEventLoop.run()
        return try #require(result)
    }

    @Test func theAskerTakesOnlyAWellFormedBoundedAnswer() throws {
        #expect(try ask(Array("ETREPLICA replica-2\n".utf8)).get() == .init(serverID: "replica-2"))
        #expect(
            try ask(Array("ETREPLICA replica-2 pace=4000\n".utf8)).get()
                == .init(serverID: "replica-2", paceMilliseconds: 4000))
        #expect(throws: ReplicaProbeError.self) { try ask(Array("HTTP/1.1 400 Bad Request\r\n".utf8)).get() }
        #expect(throws: ReplicaProbeError.self) { try ask(Array("ETREPLICA \n".utf8)).get() }
        #expect(throws: ReplicaProbeError.self) { try ask(Array(repeating: UInt8(ascii: "x"), count: 100_000)).get() }
        #expect(throws: ReplicaProbeError.self) { try ask(Array("ETREPLICA repl".utf8)).get() }  // then closed
        #expect(throws: ReplicaProbeError.self) { try ask(Array("ETREPLICA replica-2 pace=soon\n".utf8)).get() }
        #expect(throws: ReplicaProbeError.self) { try ask(Array("ETREPLICA replica-2 pace=1 x\n".utf8)).get() }
        #expect(throws: ReplicaProbeError.self) { try ask(Array("ETREPLICA  pace=1\n".utf8)).get() }
    }

    @Test func aPaceOutsideTheBoundsIsClamped() throws {
        // A broken or hostile server can neither make agents probe in a busy loop nor stop them looking.
        #expect(try ask(Array("ETREPLICA r pace=0\n".utf8)).get().paceMilliseconds == ReplicaProbe.paceRange.lowerBound)
        #expect(
            try ask(Array("ETREPLICA r pace=-5\n".utf8)).get().paceMilliseconds == ReplicaProbe.paceRange.lowerBound)
        #expect(
            try ask(Array("ETREPLICA r pace=99999999999\n".utf8)).get().paceMilliseconds
                == ReplicaProbe.paceRange.upperBound)
        // Past Int64: not a number the agent takes at all.
        #expect(throws: ReplicaProbeError.self) {
            try ask(Array("ETREPLICA r pace=99999999999999999999999\n".utf8)).get()
        }
    }
}
