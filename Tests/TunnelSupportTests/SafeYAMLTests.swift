import Testing

@testable import TunnelSupport

/// Config files are read without the traps of an untyped YAML load.
@Suite struct SafeYAMLTests {
    @Test func plainDocumentsLoad() throws {
        let value = try SafeYAML.load("serverCount: 3\ncertIPs: [10.0.0.1]\n") as? [String: Any]
        #expect(value?["serverCount"] as? Int == 3)
        #expect(try SafeYAML.load("") == nil)
    }

    @Test func aComplexKeyIsAnErrorNotACrash() {
        #expect(throws: SafeYAML.Failure.self) { try SafeYAML.load("{[a]: 1}") }
        #expect(throws: SafeYAML.Failure.self) { try SafeYAML.load("? {a: 1}\n: 2\n") }
    }

    @Test func aliasBombsAndDeepNestingAreRefused() {
        var bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        for level in 1...6 {
            bomb +=
                "\(Character(UnicodeScalar(97 + level)!)): &\(Character(UnicodeScalar(97 + level)!)) ["
                + Array(repeating: "*\(Character(UnicodeScalar(96 + level)!))", count: 10).joined(separator: ", ")
                + "]\n"
        }
        #expect(throws: SafeYAML.Failure.self) { try SafeYAML.load(bomb) }
        let deep = String(repeating: "[", count: 100) + String(repeating: "]", count: 100)
        #expect(throws: SafeYAML.Failure.self) { try SafeYAML.load(deep) }
    }
}
