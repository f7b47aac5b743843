import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelWire

@Suite struct TunnelMuxHostilePeerTests {
    let helper = TunnelMuxTests()

    @Test func whenStreamIDsRunOutTheServerSaysGoAwayInsteadOf503Forever() throws {
        var limits = TunnelLimits()
        limits.lastStreamID = 3
        let (channel, mux, _) = try helper.makeMux(.server, limits: limits)
        _ = mux.openStream(target: "edge-1:10250")
        _ = mux.openStream(target: "edge-1:10250")
        let third = mux.openStream(target: "edge-1:10250")
        let frames = try helper.outbound(channel)
        #expect(frames.map(\.type) == [.open, .open, .goaway])
        #expect(try GoAway(frame: frames[2]).reason == "stream ids exhausted: reconnect")
        guard case .failed(let failure) = try third.wait() else {
            Issue.record("a stream opened past the last id")
            return
        }
        #expect(failure.code == 503)
    }

    @Test func theAgentRefusesAReusedOrLowerStreamID() throws {
        for reused: UInt32 in [5, 3] {
            let (channel, mux, delegate) = try helper.makeMux(.agent)
            try channel.writeInbound(Open(target: "127.0.0.1:10250", window: 1024).frame(streamID: 5))
            mux.rejectStream(5, code: 502, reason: "closed")  // stream 5 is gone
            _ = try helper.outbound(channel)
            #expect(throws: FrameError.self) {
                try channel.writeInbound(Open(target: "127.0.0.1:10250", window: 1024).frame(streamID: reused))
            }
            #expect(delegate.opens.count == 1)
        }
    }

    @Test func aPingMustCarryEightBytes() throws {
        let (channel, _, _) = try helper.makeMux(.server)
        var big = ByteBuffer()
        big.writeRepeatingByte(0, count: 9)
        #expect(throws: FrameError.self) { try channel.writeInbound(Frame(type: .ping, payload: big)) }
    }

    @Test func aPeerThatNeverReadsIsCutOffBeforeItsRepliesPileUp() throws {
        var limits = TunnelLimits()
        limits.maxUnreadReplies = 10
        let (channel, _, _) = try helper.makeMux(.server, limits: limits)
        channel.isWritable = false
        var ping = ByteBuffer()
        ping.writeInteger(UInt64(7))
        for _ in 0..<10 { try channel.writeInbound(Frame(type: .ping, payload: ping)) }
        #expect(throws: FrameError.self) { try channel.writeInbound(Frame(type: .ping, payload: ping)) }
    }

    /// Keepalive needs a PING every few seconds; a peer that floods them is closed with a REFUSED naming the
    /// limit, long before its PONGs could fill a socket. Checked on the loop's clock (virtual time here).
    @Test func aPeerThatPingsFasterThanKeepaliveNeedsIsClosed() throws {
        let (channel, _, _) = try helper.makeMux(.server)
        var ping = ByteBuffer()
        ping.writeInteger(UInt64(7))
        for _ in 0..<200 {  // ten times the agent's keepalive rate, for a minute: answered
            try channel.writeInbound(Frame(type: .ping, payload: ping))
            channel.embeddedEventLoop.advanceTime(by: .milliseconds(300))
        }
        #expect(try helper.outbound(channel).filter { $0.type == .pong }.count == 200)
        for _ in 0..<32 { try channel.writeInbound(Frame(type: .ping, payload: ping)) }  // a burst: answered
        do {
            try channel.writeInbound(Frame(type: .ping, payload: ping))
            Issue.record("the 33rd PING at once was answered")
        } catch let error as FrameError {
            #expect(error.limit == "ping_rate")
        }
        let refused = try helper.outbound(channel).filter { $0.type == .refused }
        #expect(refused.count == 1)
        #expect(try Refused(frame: refused[0]).reason.contains("PINGs faster than 8.0 a second"))
    }

    /// A refused peer is closed from under TLS. A TLS handler's close waits for the peer's close_notify, and
    /// meanwhile it went on reading: a flooding peer, which never sends one, kept the loop decrypting and
    /// decoding its frames. Here a handler in TLS's place holds every close, as NIOSSL does until close_notify.
    @Test func aRefusedPeerIsClosedFromUnderTLSAndNotReadFurther() throws {
        final class HoldsCloses: ChannelOutboundHandler {
            typealias OutboundIn = Any
            func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {}
        }
        let channel = EmbeddedChannel()
        let mux = TunnelMux(role: .server, eventLoop: channel.eventLoop)
        try channel.pipeline.syncOperations.addHandlers([HoldsCloses(), FrameDecoder(), FrameEncoder(), mux])
        try channel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
        var ping = ByteBuffer()
        ping.writeInteger(UInt64(7))
        let encoder = EmbeddedChannel(handler: FrameEncoder())
        for _ in 0..<100 { try encoder.writeOutbound(Frame(type: .ping, payload: ping)) }
        var flood = ByteBuffer()
        while var part = try encoder.readOutbound(as: ByteBuffer.self) { flood.writeBuffer(&part) }
        #expect(throws: FrameError.self) { try channel.writeInbound(flood) }
        channel.embeddedEventLoop.run()
        #expect(!channel.isActive, "the close waited behind the TLS handler")
        var written = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) { written.writeBuffer(&part) }
        let decoder = EmbeddedChannel(handler: FrameDecoder())
        try decoder.writeInbound(written)
        var types: [FrameType?] = []
        while let frame = try decoder.readInbound(as: Frame.self) { types.append(frame.type) }
        #expect(types == Array(repeating: .pong, count: 32) + [.refused])
    }

    @Test func reasonsQuotingPeerInputStayBelowTheFrameLimit() throws {
        let name = String(repeating: "/", count: 140_000) + "\n\u{1b}[31m"
        let refused = Refused(reason: "registration claims node \(PeerText.bounded(name))")
        let frame = refused.frame()
        #expect(frame.payload.readableBytes < 8 * 1024)
        #expect(!refused.reason.contains("\n") && refused.reason.contains("more)"))
        let fail = OpenFail(code: 400, reason: String(repeating: "\u{1}", count: 300_000))
        #expect(fail.frame().payload.readableBytes < Frame.maxPayload)
    }

    @Test func theEncoderFailsTheConnectionInsteadOfTrappingOnAnOversizeFrame() throws {
        let channel = EmbeddedChannel(handler: FrameEncoder())
        var payload = ByteBuffer()
        payload.writeRepeatingByte(0, count: Frame.maxPayload + 1)
        #expect(throws: FrameError.self) { try channel.writeOutbound(Frame(type: .refused, payload: payload)) }
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
    }

    @Test func beforeRegistrationFramesAreCappedAt16KiB() throws {
        let channel = EmbeddedChannel(handler: FrameDecoder(maxPayload: Frame.maxUnregisteredPayload))
        var header = ByteBuffer()
        header.writeInteger(FrameType.hello.rawValue)
        header.writeInteger(UInt8(0))
        header.writeInteger(UInt16(0))
        header.writeInteger(UInt32(0))
        header.writeInteger(UInt32(Frame.maxUnregisteredPayload + 1))
        #expect(throws: FrameError.self) { try channel.writeInbound(header) }
    }
}
