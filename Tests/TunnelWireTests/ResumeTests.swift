import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelWire

/// A server and an agent mux joined by a wire that the test controls: frames move when it pumps, and are lost
/// when it drops them. Sockets (callers on the server, targets on the agent) are EmbeddedChannels with glue.
final class ResumePair {
    let loop = EmbeddedEventLoop()
    var server: (channel: EmbeddedChannel, mux: TunnelMux, delegate: RecordingDelegate)!
    var agent: (channel: EmbeddedChannel, mux: TunnelMux, delegate: RecordingDelegate)!
    var callers: [UInt32: EmbeddedChannel] = [:]
    var targets: [UInt32: EmbeddedChannel] = [:]
    let grace: TimeAmount = .seconds(30)
    /// Every frame that went on the wire (delivered or lost), by the side that sent it.
    var seen: [(from: TunnelMux.Role, type: FrameType?)] = []

    let limits: TunnelLimits

    init(limits: TunnelLimits = TunnelLimits()) throws {
        self.limits = limits
        server = try connection(.server)
        agent = try connection(.agent)
    }

    /// A new connection's mux, resumable.
    func connection(_ role: TunnelMux.Role) throws -> (EmbeddedChannel, TunnelMux, RecordingDelegate) {
        let channel = EmbeddedChannel(loop: loop)
        let mux = TunnelMux(role: role, eventLoop: loop, limits: limits)
        let delegate = RecordingDelegate()
        mux.delegate = delegate
        mux.enableResume(grace: grace)
        try channel.pipeline.syncOperations.addHandler(mux)
        try channel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
        return (channel, mux, delegate)
    }

    /// Moves frames both ways until none is left; `lose`: they are read and thrown away (lost in flight);
    /// `loseFrom`: only those that side sends are.
    func pump(lose: Bool = false, loseFrom: TunnelMux.Role? = nil) throws {
        for _ in 0..<10_000 {
            loop.run()
            var moved = false
            while let frame = try server.channel.readOutbound(as: Frame.self) {
                moved = true
                seen.append((.server, frame.type))
                if !lose, loseFrom != .server { try agent.channel.writeInbound(frame) }
            }
            loop.run()
            while let frame = try agent.channel.readOutbound(as: Frame.self) {
                moved = true
                seen.append((.agent, frame.type))
                if !lose, loseFrom != .agent { try server.channel.writeInbound(frame) }
            }
            guard moved else { return }
        }
    }

    /// Opens a stream from the server and joins both ends to sockets.
    /// `tied`: the stream is tied to its caller's channel, as every frontend's stream is (``StreamDialer``).
    func openStream(tied: Bool = false) throws -> UInt32 {
        let caller = EmbeddedChannel(loop: loop)
        let opened = server.mux.openStream(target: "127.0.0.1:10250", until: tied ? caller.closeFuture : nil)
        try pump()
        let (_, id) = agent.delegate.opens.removeLast()
        let target = EmbeddedChannel(loop: loop)
        try target.pipeline.syncOperations.addHandler(StreamGlue(mux: agent.mux, streamID: id, eventLoop: loop))
        try target.connect(to: .init(ipAddress: "127.0.0.1", port: 2)).wait()
        agent.mux.acceptStream(id)
        try pump()
        guard case .opened(let opened) = try opened.wait(), opened == id else { throw FrameError("not opened") }
        try caller.pipeline.syncOperations.addHandler(StreamGlue(mux: server.mux, streamID: id, eventLoop: loop))
        try caller.connect(to: .init(ipAddress: "127.0.0.1", port: 3)).wait()
        loop.run()
        callers[id] = caller
        targets[id] = target
        return id
    }

    /// Both connections die; both muxes suspend.
    func cut() throws {
        // `close`, not `finish`: finishing an EmbeddedChannel cancels every task scheduled on the shared loop.
        try server.channel.close().wait()
        try agent.channel.close().wait()
        loop.run()
    }

    /// The agent comes back on new connections; the server takes the suspended tunnel over, the agent expects it.
    /// The old muxes are returned.
    @discardableResult
    func resume() throws -> (server: TunnelMux, agent: TunnelMux) {
        let old = (server: server.mux, agent: agent.mux)
        server = try connection(.server)
        agent = try connection(.agent)
        #expect(agent.mux.expectResume(from: old.agent))
        let taken = server.mux.takeOver(old.server)
        loop.run()
        #expect(try taken.wait() != nil)
        try pump()
        return old
    }
}

/// Writes `count` bytes of a pattern that shows a lost, doubled or reordered byte, counting on from `offset`.
func pattern(_ count: Int, from offset: Int) -> ByteBuffer {
    var buffer = ByteBuffer()
    buffer.writeBytes((offset..<offset + count).map { UInt8(truncatingIfNeeded: $0 % 251) })
    return buffer
}

/// Equal, or the first difference recorded (not the megabytes themselves).
func sameBytes(_ got: [UInt8], _ expected: ByteBuffer) -> Bool {
    let want = Array(expected.readableBytesView)
    guard got != want else { return true }
    let at = zip(got, want).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? min(got.count, want.count)
    Issue.record("\(got.count) bytes where \(want.count) were sent; the first difference at byte \(at)")
    return false
}

func readAll(_ channel: EmbeddedChannel) throws -> [UInt8] {
    var bytes: [UInt8] = []
    while var part = try channel.readOutbound(as: ByteBuffer.self) {
        bytes += part.readBytes(length: part.readableBytes)!
    }
    return bytes
}

@Suite struct ResumeTests {
    @Test func aStreamCarriesOnByteExactAfterItsConnectionDiedWithBytesInFlightBothWays() throws {
        let pair = try ResumePair()
        let id = try pair.openStream()
        let caller = pair.callers[id]!
        let target = pair.targets[id]!
        var up: [UInt8] = []
        var down: [UInt8] = []

        // Delivered before the cut.
        try caller.writeInbound(pattern(100_000, from: 0))
        try target.writeInbound(pattern(70_000, from: 0))
        try pair.pump()
        up += try readAll(target)
        down += try readAll(caller)
        #expect(up.count == 100_000 && down.count == 70_000)

        // Sent, then lost with the connection: DATA and WINDOW frames both ways.
        try caller.writeInbound(pattern(300_000, from: 100_000))
        try target.writeInbound(pattern(200_000, from: 70_000))
        try pair.pump(lose: true)
        try pair.cut()
        #expect(pair.server.mux.isSuspended && pair.agent.mux.isSuspended)
        #expect(caller.isActive && target.isActive)  // a pause, not an error

        // Read from the sockets while suspended: waits, goes out after the resume.
        try caller.writeInbound(pattern(5_000, from: 400_000))
        try target.writeInbound(pattern(4_000, from: 270_000))
        let old = try pair.resume()
        #expect(!old.server.isSuspended && !old.agent.isSuspended)

        // Then more, and both halves close in order.
        try caller.writeInbound(pattern(50_000, from: 405_000))
        try target.writeInbound(pattern(30_000, from: 274_000))
        caller.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        target.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        try pair.pump()
        up += try readAll(target)
        down += try readAll(caller)
        #expect(sameBytes(up, pattern(455_000, from: 0)))
        #expect(sameBytes(down, pattern(304_000, from: 0)))
        #expect(pair.server.mux.streamCount == 0 && pair.agent.mux.streamCount == 0)  // FIN both ways
    }

    @Test func aSenderKeepsOnlyWhatThePeerHasNotConsumedAndGrowthCreditsNothing() throws {
        let pair = try ResumePair()
        let id = try pair.openStream()
        try pair.callers[id]!.writeInbound(pattern(300_000, from: 0))
        pair.loop.run()
        let stream = pair.server.mux.streams[id]!
        #expect(stream.retainedBytes == 300_000)  // sent, nothing credited yet
        var growth = Frame.window(streamID: id, increment: 1 << 20, allocator: .init())
        growth.flags = Frame.windowGrowth
        try pair.server.channel.writeInbound(growth)
        #expect(stream.retainedBytes == 300_000)  // a larger window is not a receipt
        // The target takes the bytes: the agent credits them (a quarter of its window at a time), and the server
        // lets go of exactly what was credited.
        try pair.pump()
        let received = pair.agent.mux.streams[id]!
        #expect(received.received == 300_000 && received.credited == 262_144)
        #expect(stream.retainedFrom == received.credited)
        #expect(stream.retainedBytes == 300_000 - 262_144)
    }

    @Test func pastItsBoundATunnelKeepsNothingMoreAndThatStreamIsResetWhenTheConnectionGoes() throws {
        var limits = TunnelLimits()
        limits.maxRetained = 300_000
        let pair = try ResumePair(limits: limits)
        let kept = try pair.openStream()
        let over = try pair.openStream()
        try pair.callers[kept]!.writeInbound(pattern(200_000, from: 0))
        try pair.callers[over]!.writeInbound(pattern(200_000, from: 7))
        pair.loop.run()
        var sent = 0
        while let frame = try pair.server.channel.readOutbound(as: Frame.self) {
            if frame.type == .data { sent += frame.payload.readableBytes }
        }
        #expect(sent == 400_000)  // nothing waits for the bound: a stream past it just keeps nothing
        #expect(pair.server.mux.retainedTotal == 200_000)
        #expect(pair.server.delegate.willNotResume == 1)  // told once, for the metric
        try pair.cut()  // all of it lost in flight
        #expect(!pair.callers[over]!.isActive && pair.callers[kept]!.isActive)
        try pair.resume()
        #expect(sameBytes(try readAll(pair.targets[kept]!), pattern(200_000, from: 0)))
        #expect(!pair.targets[over]!.isActive)
    }

    @Test func aStreamOnlyOneSideStillHoldsIsResetOnBothAndTheOthersCarryOn() throws {
        let pair = try ResumePair()
        let kept = try pair.openStream()
        let lost = try pair.openStream()
        try pair.cut()
        // While the tunnel is suspended, the second target fails: the agent gives that stream up.
        pair.targets[lost]!.pipeline.fireErrorCaught(ChannelError.ioOnClosedChannel)
        pair.loop.run()
        try pair.resume()
        #expect(!pair.callers[lost]!.isActive)  // reset: the caller sees an error
        #expect(pair.callers[kept]!.isActive)
        try pair.callers[kept]!.writeInbound(pattern(1000, from: 0))
        try pair.pump()
        #expect(sameBytes(try readAll(pair.targets[kept]!), pattern(1000, from: 0)))
        #expect(pair.server.mux.streamCount == 1 && pair.agent.mux.streamCount == 1)
        #expect(pair.server.channel.isActive && pair.agent.channel.isActive)  // the RSTs came after the RESUMEs
    }

    @Test func whenEveryStreamEndedWhileSuspendedTheResumeIsEmptyAndTheConnectionServes() throws {
        let pair = try ResumePair()
        let id = try pair.openStream()
        try pair.cut()
        pair.callers[id]!.pipeline.fireErrorCaught(ChannelError.ioOnClosedChannel)  // the caller gave up
        pair.loop.run()
        try pair.resume()
        #expect(!pair.targets[id]!.isActive)
        #expect(pair.server.channel.isActive && pair.agent.channel.isActive)
        #expect(pair.server.mux.streamCount == 0 && pair.agent.mux.streamCount == 0)
        let next = try pair.openStream()  // and the new connection carries new streams
        try pair.callers[next]!.writeInbound(pattern(10, from: 0))
        try pair.pump()
        #expect(sameBytes(try readAll(pair.targets[next]!), pattern(10, from: 0)))
    }

    @Test func aConnectionLostAgainBeforeTheAgentAnsweredSuspendsTheStreamsAgain() throws {
        let pair = try ResumePair()
        let id = try pair.openStream()
        try pair.callers[id]!.writeInbound(pattern(2000, from: 0))
        try pair.pump(lose: true)
        try pair.cut()
        // The server takes over; its RESUME is lost with the new connection.
        let oldServer = pair.server.mux
        pair.server = try pair.connection(.server)
        #expect(try pair.server.mux.takeOver(oldServer).wait() == 1)
        try pair.pump(lose: true)
        try pair.server.channel.close().wait()
        pair.loop.run()
        #expect(pair.server.mux.isSuspended && pair.callers[id]!.isActive)
        // The third connection resumes the stream, byte-exact.
        let oldAgent = pair.agent.mux
        let second = pair.server.mux
        pair.server = try pair.connection(.server)
        pair.agent = try pair.connection(.agent)
        #expect(pair.agent.mux.expectResume(from: oldAgent))
        #expect(try pair.server.mux.takeOver(second).wait() == 1)
        try pair.pump()
        #expect(sameBytes(try readAll(pair.targets[id]!), pattern(2000, from: 0)))
        // Past both grace periods nothing is reset: the stream lives on the third connection.
        pair.loop.advanceTime(by: pair.grace * 2)
        #expect(pair.callers[id]!.isActive && pair.targets[id]!.isActive)
    }

    @Test func aPeerGrantingMoreThanTheLargestWindowIsCutOff() throws {
        let pair = try ResumePair()
        let id = try pair.openStream()
        var growth = Frame.window(streamID: id, increment: 16 << 20, allocator: .init())
        growth.flags = Frame.windowGrowth
        _ = try? pair.server.channel.writeInbound(growth)
        pair.loop.run()
        let frames = try [pair.server.channel.readOutbound(as: Frame.self)].compactMap { $0 }
        #expect(frames.first?.type == .refused)
        #expect(try Refused(frame: frames[0]).reason.contains("largest window"))
    }

    @Test func whenTheGracePeriodEndsTheSuspendedStreamsFailLoudly() throws {
        let pair = try ResumePair()
        let id = try pair.openStream()
        try pair.cut()
        pair.loop.advanceTime(by: pair.grace - .seconds(1))
        #expect(pair.callers[id]!.isActive && pair.targets[id]!.isActive)
        pair.loop.advanceTime(by: .seconds(2))
        #expect(!pair.callers[id]!.isActive && !pair.targets[id]!.isActive)
        #expect(pair.server.delegate.closed && pair.agent.delegate.closed)
        // Nothing is left to take over.
        let next = try pair.connection(.server)
        #expect(try next.1.takeOver(pair.server.mux).wait() == nil)
    }

    @Test func aPeerThatNeverAnswersTheServersResumeHoldsNothingPastTheGracePeriod() throws {
        let pair = try ResumePair()
        let id = try pair.openStream()
        try pair.cut()
        let old = pair.server.mux
        pair.server = try pair.connection(.server)
        #expect(try pair.server.mux.takeOver(old).wait() == 1)
        pair.loop.run()
        #expect(try pair.server.channel.readOutbound(as: Frame.self)?.type == .resume)
        #expect(pair.callers[id]!.isActive)
        pair.loop.advanceTime(by: pair.grace + .seconds(1))
        #expect(!pair.callers[id]!.isActive)
        #expect(pair.server.mux.streamCount == 0 && pair.server.channel.isActive)
    }

    @Test func aResumeClaimingBytesThatWereNeverSentResetsThatStreamOnly() throws {
        let pair = try ResumePair()
        let id = try pair.openStream()
        try pair.callers[id]!.writeInbound(pattern(1000, from: 0))
        try pair.pump()
        try pair.cut()
        let old = pair.server.mux
        pair.server = try pair.connection(.server)
        _ = try pair.server.mux.takeOver(old).wait()
        pair.loop.run()
        let lies = [
            ResumedStream(id: id, received: 5000, credited: 0, window: 1 << 20, fin: false)  // more than was sent
        ]
        try pair.server.channel.writeInbound(Resume(streams: lies).frame())
        pair.loop.run()
        #expect(!pair.callers[id]!.isActive)
        #expect(pair.server.channel.isActive && pair.server.mux.streamCount == 0)
    }

    @Test func aResumeNobodyAskedForOrStreamFramesBeforeTheResumeCloseTheConnection() throws {
        let fresh = try ResumePair()
        _ = try? fresh.server.channel.writeInbound(Resume(streams: []).frame())
        fresh.loop.run()
        var refused = try fresh.server.channel.readOutbound(as: Frame.self)
        #expect(refused?.type == .refused && !fresh.server.channel.isActive)

        let pair = try ResumePair()
        let id = try pair.openStream()
        try pair.cut()
        let old = pair.server.mux
        pair.server = try pair.connection(.server)
        _ = try pair.server.mux.takeOver(old).wait()
        pair.loop.run()
        _ = try pair.server.channel.readOutbound(as: Frame.self)  // its RESUME
        _ = try? pair.server.channel.writeInbound(Frame(type: .data, streamID: id, payload: pattern(10, from: 0)))
        pair.loop.run()
        refused = try pair.server.channel.readOutbound(as: Frame.self)
        #expect(refused?.type == .refused)
        #expect(try Refused(frame: refused!).reason.contains("before RESUME"))
    }
}
