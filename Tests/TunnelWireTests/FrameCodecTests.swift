import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelWire

@Suite struct FrameCodecTests {
    func encode(_ frames: [Frame]) throws -> ByteBuffer {
        let channel = EmbeddedChannel(handler: FrameEncoder())
        var all = ByteBuffer()
        for frame in frames {
            try channel.writeOutbound(frame)
            while var part = try channel.readOutbound(as: ByteBuffer.self) { all.writeBuffer(&part) }
        }
        return all
    }

    func decodeAll(_ bytes: ByteBuffer, chunk: Int) throws -> [Frame] {
        let channel = EmbeddedChannel(handler: FrameDecoder())
        var input = bytes
        var frames: [Frame] = []
        while input.readableBytes > 0 {
            let slice = input.readSlice(length: min(chunk, input.readableBytes))!
            try channel.writeInbound(slice)
            while var frame = try channel.readInbound(as: Frame.self) {
                // DATA arrives in pieces as its bytes do (a byte stream); join consecutive pieces of one stream.
                if frame.type == .data, frames.last?.type == .data, frames.last?.streamID == frame.streamID {
                    frames[frames.count - 1].payload.writeBuffer(&frame.payload)
                } else {
                    frames.append(frame)
                }
            }
        }
        return frames
    }

    @Test(arguments: [1, 7, 12, 13, 4096, 1 << 20])
    func framesSurviveAnySplitting(chunk: Int) throws {
        // Byte-sized pieces of a 200 KiB frame took seconds of both cores in a debug build, and held up the
        // tests that wait on the clock: small pieces split a smaller frame, at every offset all the same.
        var big = ByteBuffer()
        big.writeBytes((0..<(chunk < 4096 ? 20 * 1024 : 200 * 1024)).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        var small = ByteBuffer()
        small.writeString("hello")
        let frames = [
            Frame(type: .data, streamID: 1, payload: small),
            Frame(type: .data, flags: 3, streamID: 7, payload: big),
            Frame.window(streamID: 7, increment: 65536, allocator: .init()),
            Frame(type: .fin, streamID: 1, payload: ByteBuffer()),
        ]
        let decoded = try decodeAll(try encode(frames), chunk: chunk)
        #expect(decoded.count == 4)
        #expect(decoded[0].type == .data && decoded[0].streamID == 1 && decoded[0].payload == small)
        #expect(decoded[1].flags == 3 && decoded[1].payload == big)
        #expect(decoded[2].type == .window && decoded[2].u32Payload == 65536)
        #expect(decoded[3].type == .fin && decoded[3].payload.readableBytes == 0)
    }

    @Test func framesBetweenFlushesLeaveAsOneBufferPerTLSRecord() throws {
        let channel = EmbeddedChannel(handler: FrameEncoder())
        var kib = ByteBuffer()
        kib.writeBytes([UInt8](repeating: 7, count: 1024))
        // Fifty streams' 1 KiB each, as fifty responses in one loop tick: not fifty TLS records.
        let completed = NIOLockedValueBox(0)
        for id in 1...50 {
            channel.write(Frame(type: .data, streamID: UInt32(id), payload: kib)).whenSuccess {
                completed.withLockedValue { $0 += 1 }
            }
        }
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)  // nothing leaves before the flush
        channel.flush()
        var buffers: [ByteBuffer] = []
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { buffers.append(buffer) }
        #expect(buffers.map(\.readableBytes) == [15 * 1036, 15 * 1036, 15 * 1036, 5 * 1036])
        #expect(buffers.allSatisfy { $0.readableBytes <= 16 * 1024 })
        #expect(completed.withLockedValue { $0 } == 50)  // every frame's promise, through the batch's
        var all = ByteBuffer()
        for var buffer in buffers { all.writeBuffer(&buffer) }
        let decoded = try decodeAll(all, chunk: 1 << 20)
        #expect(decoded.map(\.streamID) == Array(1...50) && decoded.allSatisfy { $0.payload == kib })

        // A large payload is not copied: its header closes the batch and the payload follows as it is.
        var big = ByteBuffer()
        big.writeBytes([UInt8](repeating: 9, count: 100 * 1024))
        channel.write(Frame.window(streamID: 3, increment: 1, allocator: .init()), promise: nil)
        channel.write(Frame(type: .data, streamID: 3, payload: big), promise: nil)
        channel.flush()
        #expect(try channel.readOutbound(as: ByteBuffer.self)?.readableBytes == 12 + 4 + 12)
        #expect(try channel.readOutbound(as: ByteBuffer.self) == big)
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
    }

    @Test func dataIsPassedOnAsItArrivesWithoutWaitingForTheWholeFrame() throws {
        var payload = ByteBuffer()
        payload.writeBytes((0..<(100 * 1024)).map { UInt8(truncatingIfNeeded: $0) })
        var wire = try encode([Frame(type: .data, streamID: 9, payload: payload)])
        let channel = EmbeddedChannel(handler: FrameDecoder())
        try channel.writeInbound(wire.readSlice(length: Frame.headerSize + 1000)!)
        let first = try channel.readInbound(as: Frame.self)
        #expect(first?.type == .data && first?.streamID == 9 && first?.payload.readableBytes == 1000)
        try channel.writeInbound(wire)
        let rest = try channel.readInbound(as: Frame.self)
        #expect(rest?.payload.readableBytes == payload.readableBytes - 1000)
        #expect(try channel.readInbound(as: Frame.self) == nil)
    }

    @Test func oversizeFrameIsRejectedBeforeItIsBuffered() throws {
        let channel = EmbeddedChannel(handler: FrameDecoder())
        var header = ByteBuffer()
        header.writeInteger(FrameType.data.rawValue)
        header.writeInteger(UInt8(0))
        header.writeInteger(UInt16(0))
        header.writeInteger(UInt32(1))
        header.writeInteger(UInt32(Frame.maxPayload + 1))
        #expect(throws: FrameError.self) { try channel.writeInbound(header) }
        // The stream is out of step now: nothing after the bad header is taken for a frame.
        try channel.writeInbound(try encode([Frame(type: .fin, streamID: 1, payload: ByteBuffer())]))
        #expect(try channel.readInbound(as: Frame.self) == nil)
    }

    @Test func unknownTypesAreDeliveredForTheReceiverToIgnore() throws {
        var bytes = ByteBuffer()
        bytes.writeInteger(UInt8(200))
        bytes.writeInteger(UInt8(0))
        bytes.writeInteger(UInt16(0))
        bytes.writeInteger(UInt32(0))
        bytes.writeInteger(UInt32(2))
        bytes.writeBytes([1, 2])
        let frames = try decodeAll(bytes, chunk: 100)
        #expect(frames.count == 1 && frames[0].type == nil && frames[0].rawType == 200)
    }

    @Test func controlMessagesRoundTripAndMalformedOnesNameTheirType() throws {
        let open = Open(target: "edge-node-3:10250", window: 1 << 20)
        #expect(try Open(frame: open.frame(streamID: 5)) == open)
        var junk = ByteBuffer()
        junk.writeString("{not json")
        let error = #expect(throws: FrameError.self) {
            try Hello(frame: Frame(type: .hello, payload: junk))
        }
        #expect(error?.description.contains("hello") == true)
        #expect(try OpenOK(frame: OpenOK(window: 65536).frame(streamID: 5)) == OpenOK(window: 65536))
        var short = ByteBuffer()
        short.writeInteger(UInt16(7))  // shorter than OPEN's window field
        let openError = #expect(throws: FrameError.self) {
            try Open(frame: Frame(type: .open, streamID: 5, payload: short))
        }
        #expect(openError?.description.contains("open") == true)
    }
}

@Suite struct FlowControlTests {
    @Test func peerCannotSendBeyondTheWindow() throws {
        var window = ReceiveWindow(initial: 1000, maximum: 4000)
        try window.receive(600)
        try window.receive(400)
        #expect(throws: FrameError.self) { try window.receive(1) }
    }

    @Test func creditIsBatchedToAQuarterOfTheWindow() throws {
        var window = ReceiveWindow(initial: 1000, maximum: 1000)
        try window.receive(100)
        #expect(window.consumed(100, mayGrow: true) == nil)
        try window.receive(200)
        let update = window.consumed(200, mayGrow: true)
        #expect(update == .init(increment: 300, growth: 0))
        #expect(window.outstanding == 1000)
    }

    @Test func windowGrowsOnlyForAFastReaderThatTheSenderKeepsFull() throws {
        var fast = ReceiveWindow(initial: 1000, maximum: 4000)
        try fast.receive(900)  // sender nearly out of credit
        let grown = fast.consumed(900, mayGrow: true)
        #expect(grown == .init(increment: 1900, growth: 1000))
        #expect(fast.size == 2000)

        var slow = ReceiveWindow(initial: 1000, maximum: 4000)
        try slow.receive(900)
        let notGrown = slow.consumed(900, mayGrow: false)  // the socket is not keeping up
        #expect(notGrown == .init(increment: 900, growth: 0))
        #expect(slow.size == 1000)
    }

    @Test func windowNeverExceedsItsMaximum() throws {
        var window = ReceiveWindow(initial: 1000, maximum: 1500)
        for _ in 0..<10 {
            try window.receive(window.outstanding)
            _ = window.consumed(window.size, mayGrow: true)
        }
        #expect(window.size == 1500)
    }

    @Test func sendWindowOverflowIsAProtocolError() throws {
        var send = SendWindow(initial: Int(Int32.max) - 10)
        #expect(throws: FrameError.self) { try send.grant(11) }
        try send.grant(10)
        send.consume(5)
        #expect(send.available == Int(Int32.max) - 5)
    }
}
