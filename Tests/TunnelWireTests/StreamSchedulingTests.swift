import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelWire

/// Makes its EmbeddedChannel not writable after every flush: a socket that takes one batch at a time.
final class FullAfterFlush: ChannelOutboundHandler {
    typealias OutboundIn = Any
    func flush(context: ChannelHandlerContext) {
        context.flush()
        if let channel = context.channel as? EmbeddedChannel, channel.isWritable {
            channel.isWritable = false
            context.pipeline.fireChannelWritabilityChanged()
        }
    }
}

/// Which stream's bytes go next when the tunnel is the bottleneck (interactive traffic under bulk).
@Suite struct StreamSchedulingTests {
    let helper = StreamBackpressureTests()

    /// A server mux with streams 1 and 3 open (1 MiB windows), each glued to a socket channel.
    func twoStreams() throws -> (
        loop: EmbeddedEventLoop, tunnel: EmbeddedChannel, mux: TunnelMux, sockets: [EmbeddedChannel]
    ) {
        let loop = EmbeddedEventLoop()
        let tunnel = EmbeddedChannel(loop: loop)
        let mux = TunnelMux(role: .server, eventLoop: loop)
        try tunnel.pipeline.syncOperations.addHandler(mux)
        try tunnel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
        var sockets: [EmbeddedChannel] = []
        for id in [UInt32(1), 3] {
            let opened = mux.openStream(target: "edge-1:10250")
            try tunnel.writeInbound(OpenOK(window: 1 << 20).frame(streamID: id))
            guard case .opened = try opened.wait() else { throw FrameError("not opened") }
            let socket = EmbeddedChannel(loop: loop)
            try socket.pipeline.syncOperations.addHandler(StreamGlue(mux: mux, streamID: id, eventLoop: loop))
            try socket.connect(to: .init(ipAddress: "127.0.0.1", port: 2)).wait()
            sockets.append(socket)
        }
        loop.run()
        while try tunnel.readOutbound(as: Frame.self) != nil {}
        mux.paced = true  // the link is the bottleneck (judged from its rate: see the tests below)
        return (loop, tunnel, mux, sockets)
    }

    func sent(_ tunnel: EmbeddedChannel) throws -> [Frame] {
        tunnel.embeddedEventLoop.run()
        var frames: [Frame] = []
        while let frame = try tunnel.readOutbound(as: Frame.self) { frames.append(frame) }
        return frames
    }

    @Test func aSmallReplyWaitsBehindOneTurnOfABulkStreamNotItsWholeRead() throws {
        let (_, tunnel, mux, sockets) = try twoStreams()
        let frame = mux.limits.pacedFrameSize
        try sockets[0].writeInbound(helper.bytes(256 * 1024))  // one read of a bulk transfer
        try sockets[1].writeInbound(ByteBuffer(string: "pong"))  // a keystroke's answer, just after
        let data = try sent(tunnel).filter { $0.type == .data }
        #expect(data.allSatisfy { $0.payload.readableBytes <= frame })
        let reply = try #require(data.firstIndex { $0.streamID == 3 })
        let bulkBefore = data[..<reply].reduce(0) { $0 + $1.payload.readableBytes }
        // What was written before the reply came (one flush's worth), and one turn of the bulk stream.
        #expect(bulkBefore <= mux.limits.pacedFlushBatch + frame, "\(bulkBefore) bulk bytes went first")
        #expect(String(buffer: data[reply].payload) == "pong")
        #expect(data.filter { $0.streamID == 1 }.reduce(0) { $0 + $1.payload.readableBytes } == 256 * 1024)
    }

    @Test func whileTheTunnelIsNotWritableAStreamWithNothingWaitingIsStillReadUntilTheQueueIsFull() throws {
        let (_, tunnel, mux, sockets) = try twoStreams()
        let glues = try sockets.map { try $0.pipeline.syncOperations.handler(type: StreamGlue.self) }
        tunnel.isWritable = false
        tunnel.pipeline.fireChannelWritabilityChanged()
        try sockets[0].writeInbound(helper.bytes(256 * 1024))  // a bulk read waits for the tunnel
        _ = try sent(tunnel)
        #expect(glues[0].paused, "a stream whose bytes wait is not read")
        #expect(!glues[1].paused, "a quiet stream was paused: its next reply would wait for the tunnel to drain")
        try sockets[1].writeInbound(helper.bytes(mux.limits.queuedDataLimit))  // now the queue is full
        _ = try sent(tunnel)
        #expect(glues[0].paused && glues[1].paused)
        #expect(mux.queuedData == 256 * 1024 + mux.limits.queuedDataLimit)
    }

    @Test func nothingIsWrittenWhileTheTunnelIsNotWritableAndTheStreamsResumeInTurn() throws {
        let (_, tunnel, mux, sockets) = try twoStreams()
        tunnel.isWritable = false
        tunnel.pipeline.fireChannelWritabilityChanged()
        try sockets[0].writeInbound(helper.bytes(100 * 1024))
        try sockets[1].writeInbound(helper.bytes(100 * 1024))
        #expect(try sent(tunnel).filter { $0.type == .data }.isEmpty)
        // Control frames do not wait for DATA: a new stream's OPEN leaves at once.
        _ = mux.openStream(target: "edge-1:10255")
        #expect(try sent(tunnel).map(\.type) == [.open])
        tunnel.isWritable = true
        tunnel.pipeline.fireChannelWritabilityChanged()
        let data = try sent(tunnel).filter { $0.type == .data }
        let order = data.map(\.streamID)
        // Taking turns, in smaller frames while the other waits: neither sends two in a row until one is done.
        #expect(Array(order.prefix(12)) == [1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3], "\(order)")
        #expect(data.prefix(12).allSatisfy { $0.payload.readableBytes <= mux.limits.pacedSharedFrameSize })
        for id in [UInt32(1), 3] {
            #expect(data.filter { $0.streamID == id }.reduce(0) { $0 + $1.payload.readableBytes } == 100 * 1024)
        }
        #expect(mux.queuedData == 0)
    }

    @Test func aPacedTunnelWritesNoDataWhileItsSocketHoldsEnoughUnsentAndLooksAgainSoon() throws {
        let (loop, tunnel, mux, sockets) = try twoStreams()
        var unsent = 64 * 1024  // what TCP_NOTSENT_LOWAT alone let pile up on the 40 Mbit/s link
        mux.unsentBytes = { _ in unsent }
        try sockets[0].writeInbound(helper.bytes(100 * 1024))
        #expect(try sent(tunnel).filter { $0.type == .data }.isEmpty, "DATA went into a socket holding 64 KiB unsent")
        _ = mux.openStream(target: "edge-1:10255")
        #expect(try sent(tunnel).map(\.type) == [.open], "a control frame waited for the socket")
        loop.advanceTime(by: mux.limits.pacedUnsentRecheck)
        #expect(try sent(tunnel).filter { $0.type == .data }.isEmpty, "still 64 KiB unsent")
        unsent = 0  // the link took it
        loop.advanceTime(by: mux.limits.pacedUnsentRecheck)
        let data = try sent(tunnel).filter { $0.type == .data }
        #expect(data.reduce(0) { $0 + $1.payload.readableBytes } == 100 * 1024)
        // The bound grows with the measured rate (3 ms of it): 13 KiB unsent holds back a slow tunnel, not one
        // measured at 10 MB/s.
        unsent = 13 * 1024
        try sockets[1].writeInbound(helper.bytes(20 * 1024))
        #expect(try sent(tunnel).filter { $0.type == .data }.isEmpty)
        mux.measuredRate = 10_000_000
        loop.advanceTime(by: mux.limits.pacedUnsentRecheck)
        #expect(try sent(tunnel).filter { $0.type == .data }.reduce(0) { $0 + $1.payload.readableBytes } == 20 * 1024)
        // A fast tunnel leaves its socket to the kernel.
        mux.paced = false
        unsent = 1 << 20
        try sockets[0].writeInbound(helper.bytes(4096))
        #expect(try sent(tunnel).filter { $0.type == .data }.count == 1)
    }

    @Test func aBusyTunnelWhoseLinkIsSlowBecomesPacedAndAFastOneDoesNot() throws {
        let (loop, tunnel, mux, sockets) = try twoStreams()
        mux.paced = false
        // A fast tunnel sends a read in frames of up to 256 KiB.
        try sockets[0].writeInbound(helper.bytes(200 * 1024))
        #expect(try sent(tunnel).filter { $0.type == .data }.map(\.payload.readableBytes) == [200 * 1024])
        // Half a second in which the tunnel stayed not writable after a flush and moved 200 KiB: 0.4 MB/s.
        tunnel.isWritable = false
        tunnel.pipeline.fireChannelWritabilityChanged()
        try tunnel.writeInbound(Frame.window(streamID: 3, increment: 1, allocator: .init()))  // a flush
        #expect(!mux.paced, "judged before half a second of traffic")
        tunnel.isWritable = true
        tunnel.pipeline.fireChannelWritabilityChanged()
        loop.advanceTime(by: .milliseconds(500))
        try tunnel.writeInbound(Frame.window(streamID: 1, increment: 200 * 1024, allocator: .init()))  // a flush
        #expect(mux.paced)
        #expect(mux.counters.paced, "the metrics and the agent list show the mode")
        try sockets[0].writeInbound(helper.bytes(64 * 1024))
        #expect(
            try sent(tunnel).filter { $0.type == .data }.allSatisfy {
                $0.payload.readableBytes <= mux.limits.pacedFrameSize
            })
        // Fast again once it moves more than 25 MB/s: 16 MiB in half a second.
        for _ in 0..<64 {
            try tunnel.writeInbound(Frame.window(streamID: 1, increment: 256 * 1024, allocator: .init()))
            try sockets[0].writeInbound(helper.bytes(256 * 1024))
            _ = try sent(tunnel)
        }
        loop.advanceTime(by: .milliseconds(500))
        try tunnel.writeInbound(Frame.window(streamID: 1, increment: 1, allocator: .init()))
        #expect(!mux.paced)
        #expect(!mux.counters.paced)
    }

    @Test func aTunnelThatWasNeverBlockedStaysFastHoweverLittleItMoves() throws {
        let (loop, tunnel, mux, sockets) = try twoStreams()
        mux.paced = false
        try sockets[0].writeInbound(helper.bytes(1000))
        _ = try sent(tunnel)
        loop.advanceTime(by: .milliseconds(500))
        try tunnel.writeInbound(Frame.window(streamID: 1, increment: 1000, allocator: .init()))
        #expect(!mux.paced, "an idle or lightly used tunnel is not a slow link")
    }

    @Test func aStreamOfSmallPiecesCannotStarveABulkStream() throws {
        let (_, tunnel, mux, sockets) = try twoStreams()
        // A slow link: each flush fills the socket, which takes one batch per round below.
        try tunnel.pipeline.syncOperations.addHandler(FullAfterFlush(), position: .first)
        let piece = mux.limits.pacedSharedFrameSize  // small enough to go first, and a whole flush batch
        try sockets[0].writeInbound(helper.bytes(200 * 1024))  // the bulk stream waits in line
        var frames = try sent(tunnel).filter { $0.type == .data }
        for _ in 0..<20 {
            try sockets[1].writeInbound(helper.bytes(piece))  // a new small piece in every round
            tunnel.isWritable = true  // the socket drained one batch
            tunnel.pipeline.fireChannelWritabilityChanged()
            frames += try sent(tunnel).filter { $0.type == .data }
        }
        let bulkTurns = frames.dropFirst().filter { $0.streamID == 1 }.count
        #expect(frames.contains { $0.streamID == 3 }, "no small piece went out")
        #expect(bulkTurns >= 3, "the bulk stream got \(bulkTurns) turns in 20 rounds of small pieces")
    }

    @Test func anIdleGapIsNotCountedAsASlowLink() throws {
        let (loop, tunnel, mux, sockets) = try twoStreams()
        mux.paced = false
        loop.advanceTime(by: .seconds(10))  // idle
        tunnel.isWritable = false  // a burst the socket did not take at once
        tunnel.pipeline.fireChannelWritabilityChanged()
        try sockets[0].writeInbound(helper.bytes(256 * 1024))
        try tunnel.writeInbound(Frame.window(streamID: 3, increment: 1, allocator: .init()))  // a flush
        tunnel.isWritable = true
        tunnel.pipeline.fireChannelWritabilityChanged()
        _ = try sent(tunnel)
        loop.advanceTime(by: .milliseconds(1))
        for _ in 0..<200 {  // 51 MiB in the next half second: a fast link
            try tunnel.writeInbound(Frame.window(streamID: 1, increment: 256 * 1024, allocator: .init()))
            try sockets[0].writeInbound(helper.bytes(256 * 1024))
            _ = try sent(tunnel)
        }
        loop.advanceTime(by: .milliseconds(500))
        try tunnel.writeInbound(Frame.window(streamID: 3, increment: 1, allocator: .init()))
        #expect(!mux.paced, "ten idle seconds were counted in the rate")
    }
}
