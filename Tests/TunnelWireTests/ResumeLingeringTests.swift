import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelWire

/// Resuming, continued: tunnels that do not resume, streams that ended while their last frames were in flight
/// (lingering until a confirming PING), and what the tunnel's and the process's retention bounds give back.
@Suite struct ResumeLingeringTests {
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
