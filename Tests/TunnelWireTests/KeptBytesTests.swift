import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelWire

/// `count` bytes sliced out of a read buffer of `storage` bytes, as a TLS read of one small record hands them on.
func slice(_ count: Int, ofStorage storage: Int = 32 * 1024, byte: UInt8 = 7) -> ByteBuffer {
    var read = ByteBufferAllocator().buffer(capacity: storage)
    read.writeBytes([UInt8](repeating: byte, count: count))
    return read.readSlice(length: count)!
}

/// Storage that `buffers` keep alive, counting each buffer's whole backing storage.
func pinned<S: Sequence>(_ buffers: S) -> Int where S.Element == ByteBuffer {
    buffers.reduce(0) { $0 + $1.storageCapacity }
}

/// Issue 25: one byte kept from a large read buffer kept the whole buffer alive, and no budget saw it.
@Suite struct KeptBytesTests {
    @Test func aSmallSliceOfABigBufferIsCopiedOutAndASliceThatFillsItsBufferIsNot() {
        var small = slice(1)
        #expect(small.pinsMoreThanItCarries)
        small.makeKept()
        #expect(small.readableBytes == 1 && small.storageCapacity <= 2 + KeptBytes.slack)

        var bulk = slice(30 * 1024)
        let before = bulk.storageCapacity
        bulk.makeKept()
        #expect(bulk.storageCapacity == before)  // no copy: it carries most of what it pins
    }

    @Test func onePieceAtATimeIsGatheredIntoOneBufferNotKeptAsThousands() {
        var list: [ByteBuffer] = []
        for _ in 0..<3000 { KeptBytes.appendKept(slice(1), to: &list) }
        #expect(list.reduce(0) { $0 + $1.readableBytes } == 3000)
        #expect(list.count == 1)
        #expect(pinned(list) <= 2 * 3000 + KeptBytes.slack)

        var ring = CircularBuffer<ByteBuffer>()
        for _ in 0..<3000 { KeptBytes.appendKept(slice(1), to: &ring) }
        #expect(ring.count == 1 && ring.first?.readableBytes == 3000)
    }

    @Test func gatheringStopsAtItsLimitAndLargePiecesStayApart() {
        var list: [ByteBuffer] = []
        for _ in 0..<(KeptBytes.gatherLimit / 1024 + 1) { KeptBytes.appendKept(slice(1024), to: &list) }
        #expect(list.count == 2)
        KeptBytes.appendKept(slice(30 * 1024), to: &list)
        #expect(list.count == 3)
    }

    /// Issue 25, finding 3: a peer that sends one-byte DATA frames, each in a read of its own, to a socket that
    /// stopped reading made the process hold a whole read buffer per byte.
    @Test func oneByteFramesTowardsASocketThatStoppedReadingCostTheirBytesNotTheirReadBuffers() throws {
        let (tunnel, socket, _) = try StreamBackpressureTests().openedStream(window: 100)
        socket.isWritable = false
        for _ in 0..<800 {
            try tunnel.writeInbound(Frame(type: .data, streamID: 1, payload: slice(1)))
            tunnel.embeddedEventLoop.run()
        }
        var queued: [ByteBuffer] = []
        while let part = try socket.readOutbound(as: ByteBuffer.self) { queued.append(part) }
        socket.isWritable = true
        socket.pipeline.fireChannelWritabilityChanged()
        tunnel.embeddedEventLoop.run()
        while let part = try socket.readOutbound(as: ByteBuffer.self) { queued.append(part) }
        #expect(queued.reduce(0) { $0 + $1.readableBytes } == 800)  // every byte arrives, in order
        #expect(queued.count <= 2)
        #expect(pinned(queued) <= 2 * 800 + 2 * KeptBytes.slack)  // before: 800 × 32 KiB
    }

    /// Issue 25, finding 1: bytes kept to send again after a resume, written one byte at a time by a caller.
    @Test func bytesKeptToSendAgainAreGatheredAndCopiedOutOfTheCallersReadBuffers() throws {
        let pair = try ResumePair()
        let id = try pair.openStream()
        let caller = pair.callers[id]!
        for _ in 0..<500 {
            try caller.writeInbound(slice(1))
            pair.loop.run()
        }
        // The agent's target socket does not read: nothing is credited, everything stays retained.
        pair.targets[id]!.isWritable = false
        try pair.pump()
        let stream = pair.server.mux.streams[id]!
        #expect(stream.retainedBytes == 500)
        #expect(pinned(stream.retained!) <= 2 * 500 + 2 * KeptBytes.slack)  // before: 500 × 32 KiB
    }

    @Test func whatIsLeftOfAMostlyCreditedBufferIsCopiedOut() throws {
        let stream = TunnelMux.Stream(
            id: 1, openedBy: .local, sendWindow: 1 << 20, receive: ReceiveWindow(initial: 1 << 20, maximum: 1 << 24))
        stream.retain(slice(40 * 1024, ofStorage: 64 * 1024))  // uses most of its buffer: kept as it is
        #expect(pinned(stream.retained!) == 64 * 1024)
        stream.trimRetained(upTo: 39 * 1024)
        #expect(stream.retainedBytes == 1024)
        #expect(pinned(stream.retained!) <= 2 * 1024 + KeptBytes.slack)
    }
}

/// Issue 25: windows granted in OPEN and OPEN_OK were not capped, so one stream could take a tunnel's retention.
@Suite struct GrantedWindowTests {
    @Test func anOpenGrantingMoreThanTheLargestWindowIsAProtocolError() throws {
        let (channel, _, _) = try TunnelMuxTests().makeMux(.agent)
        _ = try? channel.writeInbound(Open(target: "127.0.0.1:10250", window: 16 << 20 + 1).frame(streamID: 1))
        let frames = try TunnelMuxTests().outbound(channel)
        #expect(frames.last?.type == .refused)
        #expect(!channel.isActive)
    }

    @Test func anOpenOKGrantingMoreThanTheLargestWindowIsAProtocolError() throws {
        let (channel, mux, _) = try TunnelMuxTests().makeMux(.server)
        _ = mux.openStream(target: "edge-1:10250")
        _ = try TunnelMuxTests().outbound(channel)
        _ = try? channel.writeInbound(OpenOK(window: Int(UInt32.max)).frame(streamID: 1))
        let frames = try TunnelMuxTests().outbound(channel)
        #expect(frames.last?.type == .refused || !channel.isActive)
        #expect(!channel.isActive)
    }

    @Test func theLargestWindowItselfIsAccepted() throws {
        let (channel, _, delegate) = try TunnelMuxTests().makeMux(.agent)
        try channel.writeInbound(Open(target: "127.0.0.1:10250", window: 16 << 20).frame(streamID: 1))
        #expect(delegate.opens.count == 1)
        #expect(channel.isActive)
    }
}

/// Issue 25: the agent fell back to protocol 2 when a REFUSED reason merely contained the words, and reasons quote
/// Node addresses and names.
@Suite struct RefusedCodeTests {
    @Test func aVersionRefusalIsKnownByItsCode() throws {
        let refused = Refused(reason: "anything", code: Refused.unsupportedVersion)
        let decoded = try Refused(frame: refused.frame())
        #expect(decoded.refusesProtocolVersion(3))
    }

    @Test func aReasonThatQuotesTheWordsElsewhereIsNotAVersionRefusal() {
        let quoted = Refused(
            reason: "node IP \"protocol version 3 is not supported (server speaks \" is not claimed by node edge-1")
        #expect(!quoted.refusesProtocolVersion(3))
        let coded = Refused(reason: "protocol version 3 is not supported (server speaks 1 to 2)", code: "revoked")
        #expect(!coded.refusesProtocolVersion(3))
    }

    @Test func aServerOfVersionTwoIsStillRecognisedByItsOwnSentence() {
        let old = Refused(reason: "protocol version 3 is not supported (server speaks 1 to 2)")
        #expect(old.refusesProtocolVersion(3))
    }
}
