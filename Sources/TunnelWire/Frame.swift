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
}

/// One frame: a 12-byte header (type u8, flags u8, reserved u16, stream id u32, length u32) and a payload.
///
/// The payload is a slice of the buffer it arrived in: decoding never copies DATA bytes.
public struct Frame: Sendable {
    public static let headerSize = 12
    /// The largest payload either side sends or accepts.
    public static let maxPayload = 256 * 1024

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
    public init(_ description: String) { self.description = description }

    public static func oversize(_ length: UInt32) -> FrameError {
        FrameError("frame payload of \(length) bytes exceeds the limit of \(Frame.maxPayload)")
    }
}

/// Turns bytes into frames. Rejects oversize frames before buffering them, so a peer cannot make us hold more
/// than one maximal frame of unparsed input.
public struct FrameDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = Frame

    public init() {}

    public mutating func decode(buffer: inout ByteBuffer) throws -> Frame? {
        guard buffer.readableBytes >= Frame.headerSize else { return nil }
        let start = buffer.readerIndex
        guard let length = buffer.getInteger(at: start + 8, as: UInt32.self) else { return nil }
        guard length <= Frame.maxPayload else { throw FrameError.oversize(length) }
        guard buffer.readableBytes >= Frame.headerSize + Int(length) else { return nil }
        let rawType = buffer.readInteger(as: UInt8.self)!
        let flags = buffer.readInteger(as: UInt8.self)!
        _ = buffer.readInteger(as: UInt16.self)
        let streamID = buffer.readInteger(as: UInt32.self)!
        buffer.moveReaderIndex(forwardBy: 4)
        let payload = buffer.readSlice(length: Int(length))!
        return Frame(rawType: rawType, flags: flags, streamID: streamID, payload: payload)
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> Frame? {
        try decode(buffer: &buffer)
    }
}

/// Turns frames into bytes.
///
/// Small payloads are copied behind their header so that one TLS record carries both; large payloads go out as
/// a header write followed by the payload buffer itself (no copy).
public final class FrameEncoder: ChannelOutboundHandler {
    public typealias OutboundIn = Frame
    public typealias OutboundOut = ByteBuffer

    static let copyThreshold = 4096

    public init() {}

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        var frame = unwrapOutboundIn(data)
        let length = frame.payload.readableBytes
        precondition(length <= Frame.maxPayload, "frame payload over the limit")
        let copy = length <= Self.copyThreshold
        var header = context.channel.allocator.buffer(capacity: Frame.headerSize + (copy ? length : 0))
        header.writeInteger(frame.rawType)
        header.writeInteger(frame.flags)
        header.writeInteger(UInt16(0))
        header.writeInteger(frame.streamID)
        header.writeInteger(UInt32(length))
        if copy {
            header.writeBuffer(&frame.payload)
            context.write(wrapOutboundOut(header), promise: promise)
        } else {
            context.write(wrapOutboundOut(header), promise: nil)
            context.write(wrapOutboundOut(frame.payload), promise: promise)
        }
    }
}
