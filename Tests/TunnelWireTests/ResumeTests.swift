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

    @Test func aTunnelThatIsNotResumableEndsItsStreamsWithItsConnection() throws {
        let pair = try ResumePair()
        let mux = TunnelMux(role: .server, eventLoop: pair.loop)
        let channel = EmbeddedChannel(loop: pair.loop)
        try channel.pipeline.syncOperations.addHandler(mux)
        try channel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
        _ = mux.openStream(target: "x:1")
        try channel.writeInbound(OpenOK(window: 1000).frame(streamID: 1))
        let caller = EmbeddedChannel(loop: pair.loop)
        try caller.pipeline.syncOperations.addHandler(StreamGlue(mux: mux, streamID: 1, eventLoop: pair.loop))
        try caller.connect(to: .init(ipAddress: "127.0.0.1", port: 3)).wait()
        _ = try channel.finish(acceptAlreadyClosed: true)
        pair.loop.run()
        #expect(!mux.isSuspended && !caller.isActive)
    }
    /// A stream ends on one side once its FIN went out and the peer's came in. If that side's last DATA and FIN are
    /// lost with the connection, the peer still waits for them; before, the resume could only reset the stream.
    @Test(arguments: [TunnelMux.Role.agent, .server])
    func aStreamThatEndedWhileItsLastFramesWereInFlightEndsWholeAfterTheResume(endedSide: TunnelMux.Role) throws {
        let pair = try ResumePair()
        let id = try pair.openStream()
        let (endedSocket, waitingSocket) =
            endedSide == .agent ? (pair.targets[id]!, pair.callers[id]!) : (pair.callers[id]!, pair.targets[id]!)
        // One side sends its last bytes and its FIN: all of it is lost in flight. The other side's bytes and FIN
        // arrive: the stream has ended on the first side, and the second waits for what was lost.
        try endedSocket.writeInbound(pattern(70_000, from: 3))
        endedSocket.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        try pair.pump(loseFrom: endedSide)
        try waitingSocket.writeInbound(pattern(1000, from: 0))
        waitingSocket.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        try pair.pump(loseFrom: endedSide)
        #expect(sameBytes(try readAll(endedSocket), pattern(1000, from: 0)))
        let (ended, waiting) =
            endedSide == .agent ? (pair.agent.mux, pair.server.mux) : (pair.server.mux, pair.agent.mux)
        #expect(ended.streamCount == 0 && ended.lingeringCount == 1 && waiting.streamCount == 1)
        try pair.cut()
        #expect(ended.isSuspended && waiting.isSuspended)  // an ended stream alone is reason to wait
        pair.seen = []
        try pair.resume()
        #expect(sameBytes(try readAll(waitingSocket), pattern(70_000, from: 3)))
        #expect(!pair.seen.contains { $0.type == .rst })  // it ended cleanly
        #expect(pair.server.mux.streamCount == 0 && pair.agent.mux.streamCount == 0)
        // Both sides let the ended stream go once a PING sent after it comes back.
        pair.loop.advanceTime(by: .seconds(1))
        try pair.pump()
        #expect(pair.server.mux.lingeringCount == 0 && pair.agent.mux.lingeringCount == 0)
        #expect(pair.server.mux.retainedTotal == 0 && pair.agent.mux.retainedTotal == 0)
    }

    @Test func endedStreamsAreLetGoByConfirmingPingsThatStayUnderThePeersPingLimit() throws {
        let pair = try ResumePair()
        func oneExchange() throws {
            let id = try pair.openStream()
            for socket in [pair.callers[id]!, pair.targets[id]!] {
                try socket.writeInbound(pattern(100, from: 0))
                socket.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
            }
            try pair.pump()
        }
        for _ in 0..<5 { try oneExchange() }
        #expect(pair.server.mux.lingeringCount == 5 && pair.agent.mux.lingeringCount == 5)
        // A PONG the mux never asked for confirms nothing.
        try pair.server.channel.writeInbound(
            Frame.ping(.pong, opaque: TunnelMux.confirmingPing | 7, allocator: .init()))
        #expect(pair.server.mux.lingeringCount == 5)
        // An exchange every 50 ms for 3 s: each side sends at most a confirming PING every 500 ms, and keeps only
        // what ended since its last one came back.
        pair.seen = []
        for round in 0..<60 {
            try oneExchange()
            pair.loop.advanceTime(by: .milliseconds(50))
            try pair.pump()
            let bound = round < 10 ? 16 : 11  // the first 5 wait for the first PING, 500 ms after the start
            #expect(pair.server.mux.lingeringCount <= bound && pair.agent.mux.lingeringCount <= bound)
        }
        for side in [TunnelMux.Role.server, .agent] {
            let pings = pair.seen.filter { $0.from == side && $0.type == .ping }.count
            #expect((5...7).contains(pings), "\(side) sent \(pings) PINGs in 3 s")
        }
        #expect(pair.server.channel.isActive && pair.agent.channel.isActive)
        pair.loop.advanceTime(by: .seconds(1))
        try pair.pump()
        #expect(pair.server.mux.lingeringCount == 0 && pair.agent.mux.lingeringCount == 0)

        // The agent's direction stalls for 20 s while the server's frames still arrive, and streams keep ending on
        // the agent (their FINs come from the server): one confirming PING stays in flight, where a PING every
        // 500 ms would have queued 40, a burst past the server's limit of 32 once the path came back.
        let ids = try (0..<20).map { _ in try pair.openStream() }
        pair.seen = []
        for id in ids {
            pair.callers[id]!.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
            for _ in 0..<10 {
                pair.loop.advanceTime(by: .milliseconds(100))
                try pair.pump(loseFrom: .agent)
            }
        }
        #expect(pair.agent.mux.lingeringCount == 20)
        #expect(pair.seen.filter { $0.from == .agent && $0.type == .ping }.count == 1)

        // At most maxResumedStreams linger; the oldest go first.
        var limits = TunnelLimits()
        limits.maxResumedStreams = 3
        let small = try ResumePair(limits: limits)
        for _ in 0..<5 {
            let id = try small.openStream()
            for socket in [small.callers[id]!, small.targets[id]!] {
                socket.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
            }
            try small.pump()
        }
        #expect(small.server.mux.lingering.keys.sorted() == [5, 7, 9])
    }
    @Test(arguments: [false, true])
    func aStreamResumedManyTimesKeepsNoOldTunnelAlive(tiedToItsCaller: Bool) throws {
        let pair = try ResumePair()
        // Tied: the caller's close must reach the mux holding the stream now, without holding the old ones.
        let id = try pair.openStream(tied: tiedToItsCaller)
        var up: [UInt8] = []
        weak var firstServer = pair.server.mux
        weak var firstAgent = pair.agent.mux
        for round in 0..<5 {
            try pair.callers[id]!.writeInbound(pattern(1000, from: round * 1000))
            try pair.pump(lose: true)
            try pair.cut()
            try pair.resume()
            up += try readAll(pair.targets[id]!)
        }
        // The sockets' glue moved to each new tunnel: the old ones are gone, not chained behind the new.
        #expect(firstServer == nil && firstAgent == nil)
        try pair.callers[id]!.writeInbound(pattern(500, from: 5000))
        try pair.pump()
        up += try readAll(pair.targets[id]!)
        #expect(sameBytes(up, pattern(5500, from: 0)))
        if tiedToItsCaller {
            try pair.callers[id]!.close().wait()  // the caller goes: its stream ends on the tunnel it is on now
            try pair.pump()
            #expect(pair.server.mux.streamCount == 0 && pair.agent.mux.streamCount == 0)
        }
    }
    @Test func anEndedStreamGivesUpWhatItKeptBeforeALiveStreamStopsBeingResumable() throws {
        var limits = TunnelLimits()
        limits.maxRetained = 300_000
        let pair = try ResumePair(limits: limits)
        let ended = try pair.openStream()
        try pair.callers[ended]!.writeInbound(pattern(200_000, from: 0))  // below a quarter window: not credited
        for socket in [pair.callers[ended]!, pair.targets[ended]!] {
            socket.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        }
        try pair.pump()
        #expect(pair.server.mux.lingeringCount == 1 && pair.server.mux.retainedTotal == 200_000)
        let live = try pair.openStream()
        try pair.callers[live]!.writeInbound(pattern(200_000, from: 9))
        pair.loop.run()
        #expect(pair.server.mux.lingeringCount == 0 && pair.server.mux.retainedTotal == 200_000)
        #expect(pair.server.delegate.willNotResume == 0)
        #expect(pair.server.mux.streams[live]?.unresumable == false)
    }

    @Test func aTakeoverWithNothingToTakeStillCarriesTheStreamIds() throws {
        let pair = try ResumePair()
        _ = try pair.openStream()
        let last = try pair.openStream()
        // The server's side ends (closed on purpose); the agent's streams wait, with the server's ids seen so far.
        pair.server.mux.closeWithoutResume()
        try pair.cut()
        #expect(!pair.server.mux.isSuspended && pair.agent.mux.isSuspended)
        let old = (server: pair.server.mux, agent: pair.agent.mux)
        pair.server = try pair.connection(.server)
        pair.agent = try pair.connection(.agent)
        #expect(pair.agent.mux.expectResume(from: old.agent))
        #expect(try pair.server.mux.takeOver(old.server).wait() == nil)
        try pair.pump()
        // The next stream takes an id the agent has not seen: before, it was 1 again, and the agent cut the
        // tunnel off ("OPEN on invalid or reused stream").
        _ = pair.server.mux.openStream(target: "127.0.0.1:10250")
        try pair.pump()
        #expect(pair.agent.channel.isActive && pair.server.channel.isActive)
        #expect(pair.agent.delegate.opens.map(\.1) == [last + 2])
    }
    @Test func theProcessBoundsWhatAllTunnelsKeepAndGetsEveryByteBack() throws {
        var limits = TunnelLimits()
        let budget = RetainedBudget(limit: 300_000)
        limits.processRetained = budget
        let first = try ResumePair(limits: limits)
        let second = try ResumePair(limits: limits)
        let a = try first.openStream()
        try first.callers[a]!.writeInbound(pattern(200_000, from: 0))
        first.loop.run()
        #expect(budget.inUse == 200_000)
        // Another tunnel of the process finds the bound reached: that stream keeps nothing and will not resume.
        let b = try second.openStream()
        try second.callers[b]!.writeInbound(pattern(200_000, from: 0))
        second.loop.run()
        #expect(second.server.delegate.willNotResume == 1 && budget.inUse == 200_000)
        // Through a loss, a resume, the stream's end and its lingering: every byte comes back to the process.
        try first.pump(lose: true)
        try first.cut()
        try first.resume()
        #expect(budget.inUse == 200_000)
        for socket in [first.callers[a]!, first.targets[a]!] {
            socket.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        }
        try first.pump()
        #expect(sameBytes(try readAll(first.targets[a]!), pattern(200_000, from: 0)))
        first.loop.advanceTime(by: .seconds(1))
        try first.pump()
        #expect(first.server.mux.lingeringCount == 0)
        #expect(budget.inUse == 0)
        // And from a tunnel whose grace period ends.
        try second.cut()
        let c = try first.openStream()
        try first.callers[c]!.writeInbound(pattern(50_000, from: 0))
        first.loop.run()
        #expect(budget.inUse == 50_000)
        try first.cut()
        first.loop.advanceTime(by: first.grace + .seconds(1))
        #expect(budget.inUse == 0)
    }
    @Test func aTakeoverOntoAConnectionThatAlreadyClosedEndsTheStreamsAndGivesEverythingBack() throws {
        var limits = TunnelLimits()
        let budget = RetainedBudget(limit: 1 << 20)
        limits.processRetained = budget
        let pair = try ResumePair(limits: limits)
        let id = try pair.openStream()
        try pair.callers[id]!.writeInbound(pattern(100_000, from: 0))
        try pair.pump(lose: true)
        try pair.cut()
        #expect(budget.inUse == 100_000 && pair.callers[id]!.isActive)
        // The agent's new connection drops while the server still waits for the old one to close.
        let old = pair.server.mux
        pair.server = try pair.connection(.server)
        try pair.server.channel.close().wait()
        pair.loop.run()
        #expect(try pair.server.mux.takeOver(old).wait() == nil)
        pair.loop.run()
        #expect(budget.inUse == 0)
        #expect(!pair.callers[id]!.isActive)  // reset, not left frozen on a dead connection
    }
}
