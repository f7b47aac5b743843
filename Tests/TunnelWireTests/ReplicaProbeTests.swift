import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelWire

/// The line before TLS that tells an agent which replica the Service picked.
@Suite struct ReplicaProbeTests {
    func responder() throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(ReplicaProbeResponder(serverID: "replica-7"))
        return channel
    }

    @Test func aQuestionInPiecesIsAnsweredAndWhatFollowsPassesOnUnchanged() throws {
        let channel = try responder()
        let question = ReplicaProbe.question
        try channel.writeInbound(ByteBuffer(bytes: question.prefix(4)))
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)  // not complete: no answer yet
        try channel.writeInbound(ByteBuffer(bytes: question.dropFirst(4) + [0x16, 0x03, 0x01]))
        #expect(try channel.readOutbound(as: ByteBuffer.self).map { String(buffer: $0) } == "ETREPLICA replica-7\n")
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

    func ask(_ answer: [UInt8]) throws -> Result<String, Error> {
        let channel = EmbeddedChannel()
        let promise = channel.eventLoop.makePromise(of: String.self)
        try channel.pipeline.syncOperations.addHandler(ReplicaProbeAsker(answered: promise))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        #expect(try channel.readOutbound(as: ByteBuffer.self) == ByteBuffer(bytes: ReplicaProbe.question))
        try channel.writeInbound(ByteBuffer(bytes: answer))
        if !answer.contains(UInt8(ascii: "\n")), answer.count <= 300 { _ = try? channel.close().wait() }
        var result: Result<String, Error>?
        promise.futureResult.whenComplete { result = $0 }
        channel.embeddedEventLoop.run()
        return try #require(result)
    }

    @Test func theAskerTakesOnlyAWellFormedBoundedAnswer() throws {
        #expect(try ask(Array("ETREPLICA replica-2\n".utf8)).get() == "replica-2")
        #expect(throws: ReplicaProbeError.self) { try ask(Array("HTTP/1.1 400 Bad Request\r\n".utf8)).get() }
        #expect(throws: ReplicaProbeError.self) { try ask(Array("ETREPLICA \n".utf8)).get() }
        #expect(throws: ReplicaProbeError.self) { try ask(Array(repeating: UInt8(ascii: "x"), count: 100_000)).get() }
        #expect(throws: ReplicaProbeError.self) { try ask(Array("ETREPLICA repl".utf8)).get() }  // then closed
    }
}
