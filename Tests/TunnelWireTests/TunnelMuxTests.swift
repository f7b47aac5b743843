import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelWire

/// Records what the mux hands to its owner.
final class RecordingDelegate: TunnelMuxDelegate {
    var opens: [(Open, UInt32)] = []
    var controls: [Frame] = []
    var closed = false
    var willNotResume = 0
    func muxStreamWillNotResume(_ mux: TunnelMux) { willNotResume += 1 }
    func mux(_ mux: TunnelMux, didReceiveOpen open: Open, streamID: UInt32) { opens.append((open, streamID)) }
    func mux(_ mux: TunnelMux, didReceiveControl frame: Frame) { controls.append(frame) }
    func muxDidClose(_ mux: TunnelMux) { closed = true }
}

@Suite struct TunnelMuxTests {
    func makeMux(
        _ role: TunnelMux.Role, limits: TunnelLimits = TunnelLimits()
    ) throws
        -> (EmbeddedChannel, TunnelMux, RecordingDelegate)
    {
        let channel = EmbeddedChannel()
        let mux = TunnelMux(role: role, eventLoop: channel.eventLoop, limits: limits)
        let delegate = RecordingDelegate()
        mux.delegate = delegate
        try channel.pipeline.syncOperations.addHandler(mux)
        try channel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
        return (channel, mux, delegate)
    }

    func outbound(_ channel: EmbeddedChannel) throws -> [Frame] {
        channel.embeddedEventLoop.run()  // per-stream frames leave with the loop tick's flush
        var frames: [Frame] = []
        while let frame = try channel.readOutbound(as: Frame.self) { frames.append(frame) }
        return frames
    }

    @Test func serverOpensOddStreamsAndLearnsTheResult() throws {
        let (channel, mux, _) = try makeMux(.server)
        let first = mux.openStream(target: "edge-1:10250")
        let second = mux.openStream(target: "edge-1:10255")
        let frames = try outbound(channel)
        #expect(frames.map(\.streamID) == [1, 3])
        #expect(try Open(frame: frames[0]) == Open(target: "edge-1:10250", window: 1 << 20))

        try channel.writeInbound(OpenOK(window: 4096).frame(streamID: 1))
        try channel.writeInbound(OpenFail(code: 403, reason: "not allowed").frame(streamID: 3))
        guard case .opened(let id) = try first.wait() else {
            Issue.record("stream 1 did not open")
            return
        }
        #expect(id == 1)
        guard case .failed(let failure) = try second.wait() else {
            Issue.record("stream 3 did not fail")
            return
        }
        #expect(failure.code == 403)
        #expect(mux.streamCount == 1)
    }

    @Test func behindTheFrameCodecTheMuxReadsAndWritesBytes() throws {
        let channel = EmbeddedChannel()
        let mux = TunnelMux(role: .server, eventLoop: channel.eventLoop)
        try channel.pipeline.syncOperations.addHandlers([FrameDecoder(), FrameEncoder(), mux])
        try channel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
        func bytes(_ frames: [Frame]) throws -> ByteBuffer {
            let encoder = EmbeddedChannel(handler: FrameEncoder())
            var all = ByteBuffer()
            for frame in frames { try encoder.writeOutbound(frame) }
            while var part = try encoder.readOutbound(as: ByteBuffer.self) { all.writeBuffer(&part) }
            return all
        }
        func sent() throws -> [Frame] {
            channel.embeddedEventLoop.run()
            let decoder = EmbeddedChannel(handler: FrameDecoder())
            while let part = try channel.readOutbound(as: ByteBuffer.self) { try decoder.writeInbound(part) }
            var frames: [Frame] = []
            while let frame = try decoder.readInbound(as: Frame.self) { frames.append(frame) }
            return frames
        }

        let opened = mux.openStream(target: "edge-1:10250")
        let open = try sent()
        #expect(open.count == 1)
        #expect(try Open(frame: open[0]).target == "edge-1:10250")
        try channel.writeInbound(
            try bytes([OpenOK(window: 4096).frame(streamID: 1), .ping(.ping, opaque: 7, allocator: .init())]))
        guard case .opened(let id) = try opened.wait() else {
            Issue.record("stream 1 did not open")
            return
        }
        #expect(id == 1)
        #expect(try sent().map(\.type) == [.pong])
    }

    @Test func agentRefusesOpenOnAnEvenOrReusedStream() throws {
        let (channel, _, delegate) = try makeMux(.agent)
        try channel.writeInbound(Open(target: "127.0.0.1:10250", window: 1024).frame(streamID: 1))
        #expect(delegate.opens.count == 1 && delegate.opens[0].1 == 1)
        // Reusing stream 1 is a protocol violation: REFUSED with a reason, then the connection closes.
        _ = try? channel.writeInbound(Open(target: "127.0.0.1:10250", window: 1024).frame(streamID: 1))
        let frames = try outbound(channel)
        #expect(frames.last?.type == .refused)
        #expect(try Refused(frame: frames.last!).reason.contains("reused"))
        #expect(!channel.isActive)
        #expect(delegate.closed)
    }

    @Test func dataBeyondTheWindowClosesTheConnectionWithAReason() throws {
        var limits = TunnelLimits()
        limits.initialWindow = 64 * 1024
        let (channel, _, _) = try makeMux(.agent, limits: limits)
        try channel.writeInbound(Open(target: "127.0.0.1:10250", window: 1024).frame(streamID: 1))
        var payload = ByteBuffer()
        payload.writeBytes([UInt8](repeating: 7, count: 64 * 1024 + 1))
        _ = try? channel.writeInbound(Frame(type: .data, streamID: 1, payload: payload))
        let frames = try outbound(channel)
        #expect(frames.last?.type == .refused)
        #expect(!channel.isActive)
    }

    @Test func pingIsAnsweredAndUnknownFramesAreIgnored() throws {
        let (channel, _, delegate) = try makeMux(.agent)
        try channel.writeInbound(Frame(rawType: 99, flags: 0, streamID: 0, payload: ByteBuffer()))
        try channel.writeInbound(Frame.ping(.ping, opaque: 42, allocator: .init()))
        let frames = try outbound(channel)
        #expect(frames.count == 1 && frames[0].type == .pong)
        #expect(frames[0].payload.getInteger(at: frames[0].payload.readerIndex, as: UInt64.self) == 42)
        #expect(delegate.controls.isEmpty && channel.isActive)
    }

    @Test func closingTheTunnelFailsStreamsThatAreStillOpening() throws {
        let (channel, mux, delegate) = try makeMux(.server)
        let pending = mux.openStream(target: "edge-1:10250")
        _ = try channel.finish(acceptAlreadyClosed: true)
        guard case .failed(let failure) = try pending.wait() else {
            Issue.record("open did not fail")
            return
        }
        #expect(failure.code == 502)
        #expect(delegate.closed)
    }

    @Test func connectionBudgetShrinksInitialWindowsOfNewStreams() throws {
        var limits = TunnelLimits()
        limits.initialWindow = 1 << 20
        limits.connectionWindowBudget = 2 << 20
        let (channel, mux, _) = try makeMux(.server, limits: limits)
        for _ in 0..<3 { _ = mux.openStream(target: "edge-1:10250") }
        let windows = try outbound(channel).map { try Open(frame: $0).window }
        #expect(windows == [1 << 20, 1 << 20, 16 * 1024])
    }
}

@Suite struct StreamBackpressureTests {
    /// A server mux with stream 1 opened (peer window `window`) and glued to a socket channel.
    func openedStream(window: Int) throws -> (tunnel: EmbeddedChannel, socket: EmbeddedChannel, glue: StreamGlue) {
        let loop = EmbeddedEventLoop()
        let tunnel = EmbeddedChannel(loop: loop)
        let mux = TunnelMux(role: .server, eventLoop: loop)
        try tunnel.pipeline.syncOperations.addHandler(mux)
        try tunnel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
        let opened = mux.openStream(target: "edge-1:10250")
        try tunnel.writeInbound(OpenOK(window: window).frame(streamID: 1))
        guard case .opened = try opened.wait() else { throw FrameError("not opened") }
        loop.run()
        _ = try tunnel.readOutbound(as: Frame.self)  // the OPEN
        let socket = EmbeddedChannel(loop: loop)
        let glue = StreamGlue(mux: mux, streamID: 1, eventLoop: loop)
        try socket.pipeline.syncOperations.addHandler(glue)
        try socket.connect(to: .init(ipAddress: "127.0.0.1", port: 2)).wait()
        return (tunnel, socket, glue)
    }

    func bytes(_ count: Int) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeBytes([UInt8](repeating: 1, count: count))
        return buffer
    }

    @Test func socketPausesWithoutCreditAndResumesOnWindowEvenWithNothingPending() throws {
        let (tunnel, socket, glue) = try openedStream(window: 100)
        try socket.writeInbound(bytes(100))  // exactly the window: nothing left pending
        tunnel.embeddedEventLoop.run()  // the tunnel is flushed at the end of the loop's tick
        let data = try tunnel.readOutbound(as: Frame.self)
        #expect(data?.type == .data && data?.payload.readableBytes == 100)
        #expect(glue.paused)
        try tunnel.writeInbound(Frame.window(streamID: 1, increment: 50, allocator: .init()))
        #expect(!glue.paused)
    }

    @Test func bytesBeyondTheWindowWaitAndGoOutWhenCreditArrives() throws {
        let (tunnel, socket, glue) = try openedStream(window: 100)
        try socket.writeInbound(bytes(150))
        tunnel.embeddedEventLoop.run()
        #expect(try tunnel.readOutbound(as: Frame.self)?.payload.readableBytes == 100)
        #expect(try tunnel.readOutbound(as: Frame.self) == nil)
        #expect(glue.paused)
        try tunnel.writeInbound(Frame.window(streamID: 1, increment: 30, allocator: .init()))
        #expect(try tunnel.readOutbound(as: Frame.self)?.payload.readableBytes == 30)
        #expect(glue.paused)  // 20 bytes still pending
        try tunnel.writeInbound(Frame.window(streamID: 1, increment: 1000, allocator: .init()))
        #expect(try tunnel.readOutbound(as: Frame.self)?.payload.readableBytes == 20)
        #expect(!glue.paused)
    }

    @Test func halfCloseTravelsAfterPendingBytes() throws {
        let (tunnel, socket, _) = try openedStream(window: 10)
        try socket.writeInbound(bytes(15))
        socket.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        tunnel.embeddedEventLoop.run()
        #expect(try tunnel.readOutbound(as: Frame.self)?.type == .data)
        #expect(try tunnel.readOutbound(as: Frame.self) == nil)  // FIN waits for the last 5 bytes
        try tunnel.writeInbound(Frame.window(streamID: 1, increment: 10, allocator: .init()))
        #expect(try tunnel.readOutbound(as: Frame.self)?.payload.readableBytes == 5)
        #expect(try tunnel.readOutbound(as: Frame.self)?.type == .fin)
    }

    @Test func dataFromTheTunnelIsCreditedOnlyAfterTheSocketWroteIt() throws {
        let (tunnel, socket, _) = try openedStream(window: 100)
        let size = 1 << 20  // the initial receive window
        for _ in 0..<4 {
            try tunnel.writeInbound(Frame(type: .data, streamID: 1, payload: bytes(size / 4)))
        }
        tunnel.embeddedEventLoop.run()
        var written = 0
        while let part = try socket.readOutbound(as: ByteBuffer.self) { written += part.readableBytes }
        #expect(written == size)
        var credited = 0
        while let frame = try tunnel.readOutbound(as: Frame.self) {
            if frame.type == .window { credited += Int(frame.u32Payload ?? 0) }
        }
        #expect(credited >= size)
    }

    @Test func bytesTheSocketCouldNotTakeAreCreditedOnceItDrainedAndDoNotGrowTheWindow() throws {
        let (tunnel, socket, _) = try openedStream(window: 100)
        // Writable must mean "NIO holds nothing unsent", or credit would run ahead of the socket.
        let watermark = try socket.syncOptions!.getOption(.writeBufferWaterMark)
        #expect(watermark.low == 1 && watermark.high == 1)
        func credited() throws -> Int {
            var total = 0
            while let frame = try tunnel.readOutbound(as: Frame.self) {
                if frame.type == .window { total += Int(frame.u32Payload ?? 0) }
            }
            return total
        }
        socket.isWritable = false  // the reader is slow: the kernel's buffer is full and NIO holds the rest
        let size = 1 << 20  // the initial receive window, all of it sent: the sender is starved
        for _ in 0..<4 {
            try tunnel.writeInbound(Frame(type: .data, streamID: 1, payload: bytes(size / 4)))
        }
        tunnel.embeddedEventLoop.run()
        #expect(try credited() == 0)
        socket.isWritable = true  // drained
        socket.pipeline.fireChannelWritabilityChanged()
        tunnel.embeddedEventLoop.run()
        #expect(try credited() == size)  // exactly what was written: a slow reader never gets a larger window
    }

    @Test func socketClosingAfterItsOutputWasFinishedEndsTheStreamWithFinNotReset() throws {
        let (tunnel, socket, _) = try openedStream(window: 1000)
        try socket.writeInbound(bytes(10))  // the socket's last bytes
        // The peer is done sending: the glue finishes the socket's output, and this socket (like a TCP socket
        // whose peer had already closed) closes whole, with no input-EOF event.
        try tunnel.writeInbound(Frame(type: .fin, streamID: 1, payload: ByteBuffer()))
        tunnel.embeddedEventLoop.run()
        #expect(!socket.isActive)
        var types: [FrameType?] = []
        while let frame = try tunnel.readOutbound(as: Frame.self) { types.append(frame.type) }
        #expect(types == [.data, .fin])
    }

    @Test func readsOfManySocketsInOneTickLeaveInOneFlush() throws {
        let loop = EmbeddedEventLoop()
        let tunnel = EmbeddedChannel(loop: loop)
        let flushes = FlushCounter()
        let mux = TunnelMux(role: .server, eventLoop: loop)
        try tunnel.pipeline.syncOperations.addHandlers([flushes, mux])
        try tunnel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
        var sockets: [EmbeddedChannel] = []
        for id in [UInt32(1), 3, 5] {
            let opened = mux.openStream(target: "edge-1:10250")
            try tunnel.writeInbound(OpenOK(window: 1 << 20).frame(streamID: id))
            guard case .opened = try opened.wait() else { throw FrameError("not opened") }
            let socket = EmbeddedChannel(loop: loop)
            try socket.pipeline.syncOperations.addHandler(StreamGlue(mux: mux, streamID: id, eventLoop: loop))
            sockets.append(socket)
        }
        loop.run()
        while try tunnel.readOutbound(as: Frame.self) != nil {}
        flushes.count = 0
        for socket in sockets { try socket.writeInbound(bytes(1000)) }
        loop.run()
        var streams: [UInt32] = []
        while let frame = try tunnel.readOutbound(as: Frame.self) { streams.append(frame.streamID) }
        #expect(streams == [1, 3, 5])
        #expect(flushes.count == 1)
    }
}

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

final class FlushCounter: ChannelOutboundHandler {
    typealias OutboundIn = Frame
    var count = 0
    func flush(context: ChannelHandlerContext) {
        count += 1
        context.flush()
    }
}

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
