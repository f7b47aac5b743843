import Foundation
import Logging
import NIOCore
import NIOEmbedded
import Testing
import TunnelPKI

@testable import TunnelServer
@testable import TunnelWire

/// Counts the reads that reach the socket: what backpressure is made of.
final class ReadCounter: ChannelOutboundHandler {
    typealias OutboundIn = Any
    var reads = 0
    func read(context: ChannelHandlerContext) {
        reads += 1
        context.read()
    }
}

/// A server core from a fresh PKI folder; an agent's tunnel on an EmbeddedChannel, where the test plays the
/// agent with frames; a caller on another EmbeddedChannel behind ``HostRouter``. Routing, backpressure and every
/// answer, with virtual time instead of waits.
final class RouterFixture {
    let directory = NSTemporaryDirectory() + "edgetunnel-router-\(UUID().uuidString)"
    let core: TunnelServerCore
    let tunnel = EmbeddedChannel()
    let mux: TunnelMux
    let caller = EmbeddedChannel()
    let counter = ReadCounter()

    init(agent: Bool = true, configure: (inout ServerConfiguration) -> Void = { _ in }) throws {
        let ca = try CertificateAuthority.create()
        try ca.write(to: PKIPaths(directory: directory))
        var configuration = ServerConfiguration()
        configuration.pkiDirectory = directory
        configure(&configuration)
        core = try TunnelServerCore(configuration: configuration, logger: Logger(label: "test"))
        mux = TunnelMux(role: .server, eventLoop: tunnel.eventLoop, limits: core.limits)
        try tunnel.pipeline.syncOperations.addHandler(mux)
        try tunnel.connect(to: .init(ipAddress: "10.0.0.7", port: 40000)).wait()
        if agent {
            let node = try ca.issueNodeCertificate(nodeName: "edge-7")
            let session = AgentSession(
                nodeName: "edge-7", certificate: node.certificate, channel: tunnel, mux: mux, server: core)
            _ = try core.registry.register(session)
        }
        try caller.pipeline.syncOperations.addHandler(counter)
        try caller.pipeline.syncOperations.addHandler(HostRouter(server: core, mode: .plain))
        try caller.connect(to: .init(ipAddress: "10.1.0.1", port: 50000)).wait()
    }

    deinit { try? FileManager.default.removeItem(atPath: directory) }

    func send(_ text: String) throws { try caller.writeInbound(ByteBuffer(string: text)) }

    /// Runs both loops until neither has work (the caller and the tunnel hop between them).
    func settle() {
        for _ in 0..<8 {
            caller.embeddedEventLoop.run()
            tunnel.embeddedEventLoop.run()
        }
    }

    func framesToAgent() throws -> [Frame] {
        settle()
        var frames: [Frame] = []
        while let frame = try tunnel.readOutbound(as: Frame.self) { frames.append(frame) }
        return frames
    }

    /// The one OPEN the agent was asked for.
    func openAsked() throws -> (target: String, streamID: UInt32) {
        let frames = try framesToAgent()
        try #require(frames.count == 1 && frames[0].type == .open, "frames to the agent: \(frames.map(\.type))")
        return (try Open(frame: frames[0]).target, frames[0].streamID)
    }

    func agentAnswers(_ frame: Frame) throws {
        try tunnel.writeInbound(frame)
        settle()
    }

    func dataToAgent() throws -> String {
        try framesToAgent().filter { $0.type == .data }.map { String(buffer: $0.payload) }.joined()
    }

    func answerToCaller() throws -> String {
        settle()
        var text = ""
        while let part = try caller.readOutbound(as: ByteBuffer.self) { text += String(buffer: part) }
        return text
    }
}

@Suite struct HostRouterTests {
    @Test func aRequestForANodeWithoutAnAgentIsAOneLine502AndTheConnectionCloses() throws {
        let fixture = try RouterFixture(agent: false)
        try fixture.send("GET /metrics HTTP/1.1\r\nHost: edge-7:9100\r\n\r\n")
        let answer = try fixture.answerToCaller()
        #expect(answer.hasPrefix("HTTP/1.1 502 Bad Gateway\r\n"))
        #expect(answer.hasSuffix("\r\n\r\nno agent for node edge-7\n"))
        #expect(!fixture.caller.isActive)
    }

    @Test func aHeadThatNeverCompletesIsAnswered408AfterTheHandshakeTimeout() throws {
        let fixture = try RouterFixture()
        try fixture.send("GET /metrics HTTP/1.1\r\nHo")
        fixture.caller.embeddedEventLoop.advanceTime(by: .seconds(9))
        #expect(try fixture.answerToCaller() == "")
        fixture.caller.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(try fixture.answerToCaller().hasPrefix("HTTP/1.1 408 "))
        #expect(!fixture.caller.isActive)
    }

    @Test func theCallerIsNotReadWhileTheStreamOpensAndItsEarlyBodyGoesFirst() throws {
        let fixture = try RouterFixture()
        // Head and the first part of the body in one read, as a fast client sends them.
        try fixture.send("POST /upload HTTP/1.1\r\nHost: edge-7:8080\r\nContent-Length: 10\r\n\r\nabcd")
        let (target, id) = try fixture.openAsked()
        #expect(target == "edge-7:8080")
        let readsBefore = fixture.counter.reads
        fixture.caller.read()
        #expect(fixture.counter.reads == readsBefore, "the caller was read while its stream was being opened")
        // Bytes already read by the kernel still arrive; they are kept, not dropped.
        try fixture.send("efg")

        try fixture.agentAnswers(OpenOK(window: 1 << 20).frame(streamID: id))
        let sent = try fixture.dataToAgent()
        #expect(sent.hasPrefix("POST /upload HTTP/1.1\r\n"))
        #expect(sent.hasSuffix("\r\n\r\nabcdefg"), "sent: \(sent.debugDescription)")
        #expect(fixture.counter.reads > readsBefore, "reading did not resume once the stream was open")
        try fixture.send("hij")
        #expect(try fixture.dataToAgent() == "hij")

        // The target's answer comes back to the caller unchanged.
        let reply = "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
        try fixture.agentAnswers(Frame(type: .data, streamID: id, payload: ByteBuffer(string: reply)))
        #expect(try fixture.answerToCaller() == reply)
    }

    @Test func anAgentsRefusalIsTheCallersStatusWithItsReason() throws {
        let fixture = try RouterFixture()
        try fixture.send("GET / HTTP/1.1\r\nHost: edge-7:22\r\n\r\n")
        let (_, id) = try fixture.openAsked()
        try fixture.agentAnswers(OpenFail(code: 403, reason: "edge-7:22 is not in the allow list").frame(streamID: id))
        let answer = try fixture.answerToCaller()
        #expect(answer.hasPrefix("HTTP/1.1 403 Forbidden\r\n"))
        #expect(answer.hasSuffix("refused by agent policy: edge-7:22 is not in the allow list\n"))
        #expect(fixture.mux.streamCount == 0)
    }

    @Test func anAgentThatNeverAnswersTheOpenIsA504AfterTheDialTimeout() throws {
        let fixture = try RouterFixture()
        try fixture.send("GET / HTTP/1.1\r\nHost: edge-7\r\n\r\n")
        _ = try fixture.openAsked()
        fixture.tunnel.embeddedEventLoop.advanceTime(by: .seconds(14))
        #expect(try fixture.answerToCaller() == "")
        fixture.tunnel.embeddedEventLoop.advanceTime(by: .seconds(1))
        let answer = try fixture.answerToCaller()
        #expect(answer.hasPrefix("HTTP/1.1 504 "), "answer: \(answer)")
        #expect(answer.contains("dial timeout"))
        #expect(fixture.mux.streamCount == 0)
    }

    @Test func connectBytesSentWithTheHeadReachTheTargetAfterThe200() throws {
        let fixture = try RouterFixture()
        try fixture.send("CONNECT edge-7:10250 HTTP/1.1\r\nHost: edge-7:10250\r\n\r\nEARLY")
        let (target, id) = try fixture.openAsked()
        #expect(target == "edge-7:10250")
        #expect(try fixture.answerToCaller() == "", "answered before the agent did")
        try fixture.agentAnswers(OpenOK(window: 1 << 20).frame(streamID: id))
        #expect(try fixture.answerToCaller().hasPrefix("HTTP/1.1 200 "))
        #expect(try fixture.dataToAgent() == "EARLY")
        try fixture.send("MORE")
        #expect(try fixture.dataToAgent() == "MORE")
    }

    @Test func aCallerPastItsStreamLimitIs429() throws {
        let fixture = try RouterFixture { $0.maxStreamsPerCaller = 2 }
        let others = [EmbeddedChannel(), EmbeddedChannel()]
        for other in others { #expect(fixture.core.callerStreams.admit("address 10.1.0.1", until: other)) }
        try fixture.send("GET / HTTP/1.1\r\nHost: edge-7\r\n\r\n")
        #expect(try fixture.answerToCaller().hasPrefix("HTTP/1.1 429 "))
        #expect(try fixture.framesToAgent().isEmpty)
    }
}
