/// Text that came from a peer, made safe to echo: in a frame we send back, or in a log line.
///
/// A peer decides how long its strings are (a HELLO's node name may be 200,000 characters) and what they hold
/// (newlines that forge log lines, terminal escapes). Whatever we echo is shortened to a bound we choose, and
/// control characters are written as escapes, so no peer string can make us build an oversize frame or split
/// a log line.
public enum PeerText {
    /// The most characters of a peer string that we echo.
    public static let defaultLimit = 256

    /// At most `limit` characters of `text` (longer text ends in `…(N more)`), control characters escaped
    /// (`\n`, `\u{1b}`).
    public static func bounded(_ text: some StringProtocol, limit: Int = defaultLimit) -> String {
        var result = ""
        var count = 0
        var scalars = text.unicodeScalars.makeIterator()
        while let scalar = scalars.next() {
            guard count < limit else {
                var more = 1
                while scalars.next() != nil { more += 1 }
                result += "…(\(more) more)"
                return result
            }
            count += 1
            switch scalar {
            case "\n": result += "\\n"
            case "\r": result += "\\r"
            case "\t": result += "\\t"
            case "\\": result.unicodeScalars.append(scalar)
            default:
                if isControl(scalar) {
                    result += "\\u{\(String(scalar.value, radix: 16))}"
                } else {
                    result.unicodeScalars.append(scalar)
                }
            }
        }
        return result
    }

    /// C0 and C1 controls, and the line separators and bidirectional overrides that reorder or split what a
    /// terminal shows.
    private static func isControl(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.value {
        case 0..<0x20, 0x7f...0x9f, 0x2028, 0x2029, 0x202a...0x202e, 0x2066...0x2069: true
        default: false
        }
    }
}
