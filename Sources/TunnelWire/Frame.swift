import NIOCore

/// The frame types of the EdgeTunnel wire protocol (see docs/PROTOCOL.md).
public enum FrameType: UInt8, Sendable, CaseIterable {
    case hello = 1
    case helloOK = 2
    case open = 3
    case openOK = 4
    case openFail = 5
    case data = 6
    case window = 7
    case fin = 8
    case rst = 9
    case ping = 10
    case pong = 11
    case goaway = 12
    case join = 13
    case joinOK = 14
    case refused = 15
    case renew = 16
    case renewOK = 17
    case serverCount = 18
    case resume = 19
}

/// One frame: a 12-byte header (type u8, flags u8, reserved u16, stream id u32, length u32) and a payload.
///
/// The payload is a slice of the buffer it arrived in: decoding never copies DATA bytes.
public struct Frame: Sendable {
    public static let headerSize = 12
    /// The largest payload either side sends or accepts.
    public static let maxPayload = 256 * 1024
    /// The largest payload accepted before the peer is registered (HELLO answered) or joining: an
    /// unregistered peer cannot make us allocate more than this for one frame. HELLO, JOIN and their answers
    /// are a few hundred bytes to a few KiB (a CSR, two certificates).
    public static let maxUnregisteredPayload = 16 * 1024

    /// Raw type byte: frames of unknown types are delivered too, so that the receiver can ignore them.
    public var rawType: UInt8
    public var flags: UInt8
    public var streamID: UInt32
    public var payload: ByteBuffer

    public var type: FrameType? { FrameType(rawValue: rawType) }

    public init(type: FrameType, flags: UInt8 = 0, streamID: UInt32 = 0, payload: ByteBuffer) {
        self.rawType = type.rawValue
        self.flags = flags
        self.streamID = streamID
        self.payload = payload
    }

    public init(rawType: UInt8, flags: UInt8, streamID: UInt32, payload: ByteBuffer) {
        self.rawType = rawType
        self.flags = flags
        self.streamID = streamID
        self.payload = payload
    }
}

/// Why a connection's byte stream is not a valid frame sequence; the connection is closed with this reason.
public struct FrameError: Error, Hashable, Sendable, CustomStringConvertible {
    public let description: String
    /// The limit the peer hit, when that is why (a metric label: `frame_size`, `unread_replies`); nil for a
    /// plain protocol error.
    public let limit: String?
    public init(_ description: String, limit: String? = nil) {
        self.description = description
        self.limit = limit
    }

    public static func oversize(_ length: UInt32, limit: Int = Frame.maxPayload) -> FrameError {
        FrameError("frame payload of \(length) bytes exceeds the limit of \(limit)", limit: "frame_size")
    }
}

/// Turns bytes into frames without copying DATA.
///
/// A DATA frame is passed on in pieces as its bytes arrive, each piece a slice of the buffer it came in: a
/// 256 KiB frame that spans twenty TLS records is never gathered into one buffer (a `ByteToMessageHandler`
/// would append every record to its cumulation buffer and move the remainder down after each frame: two copies
/// of every byte). Receivers treat DATA as a byte stream, so pieces are indistinguishable from frames.
/// Other frames are delivered whole; their payload is gathered only when it spans reads. Oversize frames are
/// rejected from their header, so a peer cannot make us hold more than one maximal control frame.
/// After an error the connection's input is ignored (the error is fired for the pipeline to close it).
public final class FrameDecoder: ChannelInboundHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = Frame

    private enum State {
        case header
        /// Inside a DATA frame: `remaining` payload bytes still to come.
        case data(streamID: UInt32, flags: UInt8, remaining: Int)
        /// Gathering the payload of a non-DATA frame that spans reads.
        case control(rawType: UInt8, flags: UInt8, streamID: UInt32, length: Int)
        case failed
    }

    private var state = State.header
    /// Header bytes, or a control payload, split across reads.
    private var partial: ByteBuffer?
    /// The ``TunnelMux`` of this pipeline, set by the mux while it is in it: frames go to it by a direct call.
    /// Through the pipeline each `Frame` would be boxed into an `NIOAny` (too large to store inline): one
    /// allocation per frame.
    var sink: TunnelMux?
    /// The largest payload accepted now: ``Frame/maxUnregisteredPayload`` until the connection is registered.
    public var maxPayload: Int

    /// - Parameter maxPayload: the largest payload accepted until ``maxPayload`` is raised (by the mux once the
    ///   peer is registered, see ``TunnelMux/peerRegistered()``).
    public init(maxPayload: Int = Frame.maxPayload) {
        self.maxPayload = maxPayload
    }

    /// Drops every byte still to come, unparsed: the connection has failed and is closing.
    func discardInput() {
        state = .failed
        partial = nil
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        do {
            while buffer.readableBytes > 0 {
                if let frame = try next(&buffer, allocator: context.channel.allocator) {
                    if let sink {
                        sink.receive(frame)
                    } else {
                        context.fireChannelRead(wrapInboundOut(frame))
                    }
                }
            }
        } catch {
            state = .failed
            partial = nil
            context.fireErrorCaught(error)
        }
    }

    /// Consumes bytes of `buffer` and returns a frame (or DATA piece) when one is complete.
    private func next(_ buffer: inout ByteBuffer, allocator: ByteBufferAllocator) throws -> Frame? {
        switch state {
        case .failed:
            buffer.moveReaderIndex(to: buffer.writerIndex)
            return nil
        case .data(let streamID, let flags, let remaining):
            let count = min(remaining, buffer.readableBytes)
            let piece = buffer.readSlice(length: count)!
            state = count == remaining ? .header : .data(streamID: streamID, flags: flags, remaining: remaining - count)
            return Frame(rawType: FrameType.data.rawValue, flags: flags, streamID: streamID, payload: piece)
        case .control(let rawType, let flags, let streamID, let length):
            let count = min(length - partial!.readableBytes, buffer.readableBytes)
            var part = buffer.readSlice(length: count)!
            partial!.writeBuffer(&part)
            guard partial!.readableBytes == length else { return nil }
            let payload = partial!
            partial = nil
            state = .header
            return Frame(rawType: rawType, flags: flags, streamID: streamID, payload: payload)
        case .header:
            var header: ByteBuffer
            if partial == nil && buffer.readableBytes >= Frame.headerSize {
                header = buffer.readSlice(length: Frame.headerSize)!
            } else {
                if partial == nil { partial = allocator.buffer(capacity: Frame.headerSize) }
                var part = buffer.readSlice(
                    length: min(Frame.headerSize - partial!.readableBytes, buffer.readableBytes))!
                partial!.writeBuffer(&part)
                guard partial!.readableBytes == Frame.headerSize else { return nil }
                header = partial!
                partial = nil
            }
            let rawType = header.readInteger(as: UInt8.self)!
            let flags = header.readInteger(as: UInt8.self)!
            header.moveReaderIndex(forwardBy: 2)
            let streamID = header.readInteger(as: UInt32.self)!
            let length = header.readInteger(as: UInt32.self)!
            guard length <= maxPayload else { throw FrameError.oversize(length, limit: maxPayload) }
            let size = Int(length)
            if rawType == FrameType.data.rawValue && size > 0 {
                state = .data(streamID: streamID, flags: flags, remaining: size)
                return nil
            }
            if buffer.readableBytes >= size {
                return Frame(
                    rawType: rawType, flags: flags, streamID: streamID, payload: buffer.readSlice(length: size)!)
            }
            partial = allocator.buffer(capacity: size)
            state = .control(rawType: rawType, flags: flags, streamID: streamID, length: size)
            return nil
        }
    }
}

/// Turns frames into bytes, batched: the frames written between two flushes leave as few buffers as possible.
///
/// TLS makes one record of every buffer written to it (swift-nio-ssl encrypts each write on its own), so a
/// header and its small payload as separate buffers — or fifty streams' 1 KiB responses as fifty buffers —
/// would cost a record, an AES-GCM pass and a few allocations each. Small payloads (≤ 4 KiB) are copied
/// behind their header into a batch of up to 16 KiB, one record's worth; a large payload's header closes the
/// batch and the payload follows as its own buffer (no copy). The batch is handed on at `flush` or `close`.
public final class FrameEncoder: ChannelOutboundHandler {
    public typealias OutboundIn = Frame
    public typealias OutboundOut = ByteBuffer

    static let copyThreshold = 4096
    /// The most plaintext one TLS record carries.
    static let batchLimit = 16 * 1024

    private var batch: ByteBuffer?
    /// Completed when the batch is written: the promise of the batch's first frame that had one, the later
    /// ones cascaded from it.
    private var batchPromise: EventLoopPromise<Void>?
    /// This handler's context, for ``encode(_:)``.
    private var context: ChannelHandlerContext?

    public init() {}

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        encode(unwrapOutboundIn(data), context: context, promise: promise)
    }

    /// Writes a frame as `write` does, called directly by the ``TunnelMux`` next to this encoder (no `NIOAny`
    /// box per frame). Returns false once the encoder has left the pipeline.
    func encode(_ frame: Frame) -> Bool {
        guard let context else { return false }
        encode(frame, context: context, promise: nil)
        return true
    }

    private func encode(_ frame: Frame, context: ChannelHandlerContext, promise: EventLoopPromise<Void>?) {
        var frame = frame
        let length = frame.payload.readableBytes
        guard length <= Frame.maxPayload else {
            // Every frame we build is bounded (DATA by the send loop, reasons by `maxReasonLength`); should one
            // ever not be, the connection fails with the reason — the process and its other peers go on.
            let error = FrameError(
                "refusing to send a \(FrameType(rawValue: frame.rawType).map { "\($0)" } ?? "type \(frame.rawType)") "
                    + "frame of \(length) bytes: over the limit of \(Frame.maxPayload)")
            promise?.fail(error)
            context.fireErrorCaught(error)
            return
        }
        let copy = length <= Self.copyThreshold
        let needed = Frame.headerSize + (copy ? length : 0)
        if let batch, batch.readableBytes + needed > Self.batchLimit {
            emitBatch(context)
        }
        if batch == nil {
            batch = context.channel.allocator.buffer(capacity: copy ? Self.batchLimit : needed)
        }
        batch!.writeInteger(frame.rawType)
        batch!.writeInteger(frame.flags)
        batch!.writeInteger(UInt16(0))
        batch!.writeInteger(frame.streamID)
        batch!.writeInteger(UInt32(length))
        if copy {
            batch!.writeBuffer(&frame.payload)
            addToBatch(promise)
        } else {
            emitBatch(context)
            context.write(wrapOutboundOut(frame.payload), promise: promise)
        }
    }

    public func flush(context: ChannelHandlerContext) {
        emitBatch(context)
        context.flush()
    }

    public func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        // Written but not flushed: handed on, so the channel fails or writes it as it does any unflushed write.
        emitBatch(context)
        context.close(mode: mode, promise: promise)
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        batch = nil
        batchPromise?.fail(ChannelError.ioOnClosedChannel)
        batchPromise = nil
    }

    private func addToBatch(_ promise: EventLoopPromise<Void>?) {
        guard let promise else { return }
        if let batchPromise {
            batchPromise.futureResult.cascade(to: promise)
        } else {
            batchPromise = promise
        }
    }

    private func emitBatch(_ context: ChannelHandlerContext) {
        guard let bytes = batch else { return }
        let promise = batchPromise
        batch = nil
        batchPromise = nil
        context.write(wrapOutboundOut(bytes), promise: promise)
    }
}
