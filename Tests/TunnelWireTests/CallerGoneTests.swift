import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelWire

/// A caller that goes away while its stream is opened (issue 25, finding 5): the stream goes with it, whatever
/// the frontend got to do, and an orderly end is still not turned into a reset.
@Suite struct CallerGoneTests {
    /// A server mux whose streams draw on a process budget, and a caller's channel, on one loop.
    final class Setup {
        let loop = EmbeddedEventLoop()
        let tunnel: EmbeddedChannel
        let caller: EmbeddedChannel
        let mux: TunnelMux
        let budget = WindowBudget(limit: 64 << 20)

        init(maxPendingOpens: Int = 1024) throws {
            var limits = TunnelLimits()
            limits.processBudget = budget
            limits.maxPendingOpens = maxPendingOpens
            tunnel = EmbeddedChannel(loop: loop)
            caller = EmbeddedChannel(loop: loop)
            mux = TunnelMux(role: .server, eventLoop: loop, limits: limits)
            try tunnel.pipeline.syncOperations.addHandler(mux)
            try tunnel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
            try caller.connect(to: .init(ipAddress: "127.0.0.1", port: 2)).wait()
        }

        /// The frames sent to the agent since the last look (per-stream frames leave with the tick's flush).
        func sent() throws -> [Frame] {
            loop.run()
            var frames: [Frame] = []
            while let frame = try tunnel.readOutbound(as: Frame.self) { frames.append(frame) }
            return frames
        }

        /// Nothing of any stream is left: not in the map, not pending, not in either budget.
        func expectNothingHeld(_ comment: Comment, sourceLocation: SourceLocation = #_sourceLocation) {
            #expect(mux.streamCount == 0, comment, sourceLocation: sourceLocation)
            #expect(mux.pendingOpens == 0, comment, sourceLocation: sourceLocation)
            #expect(mux.windowBudgetUsed == 0, comment, sourceLocation: sourceLocation)
            #expect(budget.inUse == 0, comment, sourceLocation: sourceLocation)
            #expect(mux.counters.snapshot.streams == 0, comment, sourceLocation: sourceLocation)
        }
    }

    func bytes(_ count: Int) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeBytes([UInt8](repeating: 1, count: count))
        return buffer
    }

    @Test func aCallerGoneWhileTheStreamOpensCancelsItAndTheAnswerThatCrossedIsDropped() throws {
        let setup = try Setup(maxPendingOpens: 1)
        let opened = setup.mux.openStream(target: "edge-1:10250", until: setup.caller.closeFuture)
        #expect(try setup.sent().map(\.type) == [.open])
        #expect(setup.budget.inUse > 0 && setup.mux.pendingOpens == 1)

        try setup.caller.close().wait()
        let frames = try setup.sent()
        #expect(
            frames.map(\.type) == [.rst] && frames.first?.streamID == 1, "the agent is told at once: it drops its dial")
        guard case .failed(let failure) = try opened.wait() else {
            Issue.record("a cancelled open was answered as opened")
            return
        }
        #expect(failure.code == OpenFail.callerGoneCode)
        setup.expectNothingHeld("the cancelled stream still holds something")

        // The agent's OPEN_OK crossed our RST: dropped here (the RST answers it), and the tunnel is not at fault.
        try setup.tunnel.writeInbound(OpenOK(window: 1 << 20).frame(streamID: 1))
        #expect(try setup.sent().isEmpty)
        #expect(setup.tunnel.isActive)
        setup.expectNothingHeld("the late OPEN_OK brought the stream back")

        // The pending open was given back: the next stream opens although one is the limit.
        _ = setup.mux.openStream(target: "edge-1:10250")
        #expect(try setup.sent().map(\.type) == [.open])
    }

    @Test func aCallerAlreadyGoneWhenTheOpenStartsIsResetRightAfterItsOpen() throws {
        let setup = try Setup()
        try setup.caller.close().wait()
        setup.loop.run()  // the close future completes
        let opened = setup.mux.openStream(target: "edge-1:10250", until: setup.caller.closeFuture)
        // Never an RST before its OPEN: the agent would take that for a protocol error.
        #expect(try setup.sent().map(\.type) == [.open, .rst])
        guard case .failed(let failure) = try opened.wait() else {
            Issue.record("the open of a caller that was gone succeeded")
            return
        }
        #expect(failure.code == OpenFail.callerGoneCode)
        setup.expectNothingHeld("the stream of a caller already gone was kept")
    }

    /// Writing the 200 to a caller that has closed fails (EPIPE) and NIO closes the channel inside that write: its
    /// `channelInactive` has passed when the glue is added, so the glue never tells the mux the socket closed.
    @Test func aGlueAddedToASocketThatHadAlreadyClosedStillEndsItsStream() throws {
        let setup = try Setup()
        let opened = setup.mux.openStream(target: "edge-1:10250", until: setup.caller.closeFuture)
        try setup.tunnel.writeInbound(OpenOK(window: 1 << 20).frame(streamID: 1))
        guard case .opened(let id) = try opened.wait() else {
            Issue.record("not opened")
            return
        }
        _ = try setup.sent()
        setup.caller.close(promise: nil)  // channelInactive now; the pipeline goes on the next tick
        try setup.caller.pipeline.syncOperations.addHandler(
            StreamGlue(mux: setup.mux, streamID: id, eventLoop: setup.loop))
        setup.caller.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)  // the EOF read before the close
        let frames = try setup.sent()
        #expect(frames.last?.type == .rst && frames.last?.streamID == id, "frames: \(frames.map(\.type))")
        setup.expectNothingHeld("a stream glued to a closed socket stayed open")
    }

    @Test func anOpenedStreamNoGlueWasEverAttachedToIsResetWhenItsCallerCloses() throws {
        let setup = try Setup()
        let opened = setup.mux.openStream(target: "edge-1:10250", until: setup.caller.closeFuture)
        try setup.tunnel.writeInbound(OpenOK(window: 1 << 20).frame(streamID: 1))
        guard case .opened = try opened.wait() else {
            Issue.record("not opened")
            return
        }
        _ = try setup.sent()
        try setup.tunnel.writeInbound(Frame(type: .data, streamID: 1, payload: bytes(100)))  // held for a glue
        try setup.caller.close().wait()
        #expect(try setup.sent().map(\.type) == [.rst])
        setup.expectNothingHeld("a stream without a glue outlived its caller")
    }

    /// The caller's socket ended in order (its output finished, then it closed) with bytes still waiting for credit:
    /// they go out, then FIN, even though the caller's channel has closed meanwhile.
    @Test func anOrderlyEndIsNotTurnedIntoAResetWhenTheCallersChannelCloses() throws {
        let setup = try Setup()
        let opened = setup.mux.openStream(target: "edge-1:10250", until: setup.caller.closeFuture)
        try setup.tunnel.writeInbound(OpenOK(window: 10).frame(streamID: 1))
        guard case .opened(let id) = try opened.wait() else {
            Issue.record("not opened")
            return
        }
        try setup.caller.pipeline.syncOperations.addHandler(
            StreamGlue(mux: setup.mux, streamID: id, eventLoop: setup.loop))
        _ = try setup.sent()
        try setup.caller.writeInbound(bytes(30))  // 10 go, 20 wait for credit
        // The agent's FIN: the glue finishes the socket's output; the socket then closes whole.
        try setup.tunnel.writeInbound(Frame(type: .fin, streamID: id, payload: ByteBuffer()))
        setup.loop.run()
        #expect(!setup.caller.isActive)
        var frames = try setup.sent()
        #expect(frames.map(\.type) == [.data], "frames: \(frames.map(\.type))")
        #expect(setup.mux.streamCount == 1, "the stream was given up with 20 bytes still to send")

        try setup.tunnel.writeInbound(Frame.window(streamID: id, increment: 100, allocator: .init()))
        frames = try setup.sent()
        #expect(frames.map(\.type) == [.data, .fin], "frames: \(frames.map(\.type))")
        #expect(frames.first?.payload.readableBytes == 20)
        setup.expectNothingHeld("the stream did not end after its FIN")
    }

    @Test func cancellingAStreamThatIsStillOpeningAnswersItsOpen() throws {
        let setup = try Setup()
        let opened = setup.mux.openStream(target: "edge-1:10250")
        _ = try setup.sent()
        setup.mux.cancelStream(1)
        #expect(try setup.sent().map(\.type) == [.rst])
        guard case .failed = try opened.wait() else {
            Issue.record("a cancelled open was answered as opened")
            return
        }
        setup.expectNothingHeld("the cancelled stream still holds something")
    }
}
