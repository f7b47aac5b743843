/// Durations written the way Kubernetes tools write them: `24h`, `30m`, `90s`, `1h30m`, `7d`, `500ms`.
public enum Durations {
    /// Parses `text` into seconds, or throws an error naming it. `0` is zero.
    public static func parse(_ text: String, what: String = "duration") throws -> Double {
        if text == "0" { return 0 }
        var total = 0.0
        var number = ""
        var unit = ""
        var sawAny = false
        func flush() throws {
            guard !number.isEmpty, let value = Double(number) else { throw invalid() }
            let scale: Double
            switch unit {
            case "ms": scale = 0.001
            case "s": scale = 1
            case "m": scale = 60
            case "h": scale = 3600
            case "d": scale = 86400
            default: throw invalid()
            }
            total += value * scale
            number = ""
            unit = ""
            sawAny = true
        }
        func invalid() -> PKIError {
            PKIError(.invalidDuration, "invalid \(what) \"\(text)\": use a number with a unit, e.g. 90s, 30m, 24h, 7d")
        }
        for character in text {
            if character.isASCII && (character.isNumber || character == ".") {
                if !unit.isEmpty { try flush() }
                number.append(character)
            } else if character.isASCII && character.isLetter {
                guard !number.isEmpty else { throw invalid() }
                unit.append(character)
            } else {
                throw invalid()
            }
        }
        if !number.isEmpty || !unit.isEmpty { try flush() }
        guard sawAny, total.isFinite, total >= 0 else { throw invalid() }
        return total
    }

    /// A short readable form with the two largest units, e.g. `23h59m`, `30d`, `45s`.
    public static func format(_ seconds: Double) -> String {
        var rest = Int(seconds.rounded(.down))
        if rest <= 0 { return "0s" }
        var parts = ""
        var units = 0
        for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] where rest >= size && units < 2 {
            parts += "\(rest / size)\(unit)"
            rest %= size
            units += 1
        }
        return parts
    }
}
