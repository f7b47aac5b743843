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

final class FlushCounter: ChannelOutboundHandler {
    typealias OutboundIn = Frame
    var count = 0
    func flush(context: ChannelHandlerContext) {
        count += 1
        context.flush()
    }
}
