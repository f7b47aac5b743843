import NIOCore

/// How bytes that outlive the read they came in are kept, so that what they cost in memory stays a fixed multiple
/// of what they carry.
///
/// A `ByteBuffer` slice keeps its whole backing storage alive: one byte sliced out of a 32 KiB TLS read buffer
/// pins 32 KiB. Every place that keeps bytes past the read that brought them (a stream's DATA before delivery,
/// bytes queued towards a slow socket, socket bytes waiting for credit, bytes kept to send again after a resume)
/// keeps them through the two rules here, so the budgets that count bytes also bound memory:
/// - a slice that pins more than twice its length plus ``slack`` is copied out of its buffer (``ByteBuffer/makeKept()``);
/// - a small piece is appended to the last kept buffer rather than kept on its own (``appendKept(_:to:)``), so a
///   peer sending one byte per frame cannot make us hold one buffer object (about 100 bytes) per byte.
///
/// So kept bytes cost at most `2 × bytes + slack` of storage per buffer, and each buffer but the last of a list
/// holds at least ``smallPiece`` bytes (or is a copy-free slice that uses most of its storage). Measured in
/// docs/benchmarks.md: bulk transfers rarely copy, since a bulk read carries one stream's bytes.
public enum KeptBytes {
    /// Storage beyond twice its length that a kept slice may pin before it is copied out.
    public static let slack = 512
    /// Pieces up to this size are appended to the last kept buffer.
    public static let smallPiece = 4096
    /// ... as long as that buffer holds no more than this.
    public static let gatherLimit = 64 * 1024

    /// Appends `piece` to `list`, gathered into the last buffer when small, otherwise on its own and copied out of
    /// its storage if it would pin much more than it carries.
    public static func appendKept<List: RangeReplaceableCollection & BidirectionalCollection>(
        _ piece: ByteBuffer, to list: inout List
    ) where List.Element == ByteBuffer {
        var piece = piece
        // Only the count of the last buffer is looked at: a copy of the buffer itself, alive during the write below,
        // would make the write copy the whole gathered buffer every time (a copy of up to 64 KiB per small piece,
        // which the benchmark showed as a third fewer 1 KiB requests a second).
        if piece.readableBytes <= smallPiece, let lastCount = list.last?.readableBytes,
            lastCount + piece.readableBytes <= gatherLimit
        {
            // Taken out so that the write appends in place (an element still in the list would be copied whole).
            var gathered = list.removeLast()
            if gathered.pinsMoreThanItCarries(adding: piece.readableBytes) {
                gathered = ByteBuffer.copying(gathered, reserving: piece.readableBytes)
            }
            gathered.writeBuffer(&piece)
            list.append(gathered)
            return
        }
        piece.makeKept()
        list.append(piece)
    }
}

extension ByteBuffer {
    /// Whether keeping this buffer would pin more than twice its bytes plus ``KeptBytes/slack``.
    public var pinsMoreThanItCarries: Bool { pinsMoreThanItCarries(adding: 0) }

    func pinsMoreThanItCarries(adding count: Int) -> Bool {
        storageCapacity > 2 &* (readableBytes &+ count) &+ KeptBytes.slack
    }

    /// Makes this buffer fit to keep: a copy of its bytes in storage of their own when it would pin more than it
    /// carries, otherwise itself (no copy).
    public mutating func makeKept() {
        if pinsMoreThanItCarries { self = .copying(self, reserving: 0) }
    }

    /// A new buffer holding `buffer`'s readable bytes, with room for `extra` more.
    static func copying(_ buffer: ByteBuffer, reserving extra: Int) -> ByteBuffer {
        var copy = ByteBufferAllocator().buffer(capacity: buffer.readableBytes + extra)
        copy.writeImmutableBuffer(buffer)
        return copy
    }
}
