import Foundation
import Testing

@testable import TunnelPKI

@Suite struct TokenStoreTests {
    let dir = TemporaryDirectory()
    var store: TokenStore { TokenStore(paths: PKIPaths(directory: dir.file("pki"))) }

    @Test func createdTokenVerifiesAndOnlyItsHashIsStored() throws {
        let (token, stored) = try store.create(ttl: 3600, description: "edge pool A")
        #expect(token.description.wholeMatch(of: /[a-z0-9]{6}\.[a-z0-9]{16}/) != nil)
        #expect(try store.verify(token.description) == stored)

        let file = try String(contentsOfFile: store.path, encoding: .utf8)
        #expect(!file.contains(token.secret))
        #expect(file.contains(token.id))
        #expect(mode(of: store.path) == 0o600)
    }

    @Test func wrongSecretUnknownIdExpiredAndMalformedAreRefused() throws {
        let (token, _) = try store.create(ttl: 60)
        let wrong = "\(token.id).\(String(repeating: "a", count: 16))"
        var error = #expect(throws: PKIError.self) { try store.verify(wrong) }
        #expect(error?.code == .invalidToken)
        #expect(error?.message.contains("aaaaaaaaaaaaaaaa") == false)

        error = #expect(throws: PKIError.self) { try store.verify("zzzzzz.0123456789abcdef") }
        #expect(error?.code == .tokenNotFound)

        error = #expect(throws: PKIError.self) {
            try store.verify(token.description, now: Date().addingTimeInterval(120))
        }
        #expect(error?.code == .tokenExpired)

        for malformed in [
            "", "abc.def", "ABCDEF.0123456789abcdef", "abcdef0123456789abcdef", "abcdef.0123456789abcde!",
        ] {
            error = #expect(throws: PKIError.self) { try store.verify(malformed) }
            #expect(error?.code == .invalidToken)
        }
    }

    @Test func zeroTTLNeverExpiresAndDeleteRemoves() throws {
        let (forever, stored) = try store.create(ttl: 0)
        #expect(stored.expires == nil)
        try store.verify(forever.description, now: Date().addingTimeInterval(100 * 365 * 86400))
        let (other, _) = try store.create(ttl: 60)
        try store.delete(id: forever.id)
        #expect(try store.list().map(\.id) == [other.id])
        #expect(throws: PKIError.self) { try store.verify(forever.description) }
        let error = #expect(throws: PKIError.self) { try store.delete(id: forever.id) }
        #expect(error?.code == .tokenNotFound)
    }

    @Test func corruptTokenFileIsNamed() throws {
        try AtomicFile.makeDirectory(dir.file("pki"), mode: 0o700)
        _ = dir.write("{not json", to: "pki/tokens.json")
        let error = #expect(throws: PKIError.self) { try store.list() }
        #expect(error?.message.hasPrefix(store.path) == true)
    }
}

@Suite struct DurationTests {
    @Test func parsesKubernetesStyleDurations() throws {
        #expect(try Durations.parse("24h") == 86400)
        #expect(try Durations.parse("1h30m") == 5400)
        #expect(try Durations.parse("90s") == 90)
        #expect(try Durations.parse("7d") == 7 * 86400)
        #expect(try Durations.parse("500ms") == 0.5)
        #expect(try Durations.parse("0") == 0)
    }

    @Test(arguments: ["", "h", "5", "5x", "-5s", "1h-", "1.2.3s"])
    func rejectsMalformedDurations(_ text: String) {
        let error = #expect(throws: PKIError.self) { try Durations.parse(text, what: "--ttl") }
        #expect(error?.message.contains("--ttl") == true)
    }

    @Test func formatsShortly() {
        #expect(Durations.format(86399) == "23h59m")
        #expect(Durations.format(90061) == "1d1h")
        #expect(Durations.format(45) == "45s")
        #expect(Durations.format(30 * 86400) == "30d")
        #expect(Durations.format(0) == "0s")
    }
}

@Suite struct AtomicFileTests {
    @Test func failedWriteLeavesNothingBehind() throws {
        let dir = TemporaryDirectory()
        let error = #expect(throws: PKIError.self) {
            try AtomicFile.write(Array("x".utf8), to: dir.file("missing/sub/file"), mode: 0o600)
        }
        #expect(error?.code == .writeFailed)
        #expect(dir.snapshot().isEmpty)
    }

    @Test func replacesWholeFileWithExactMode() throws {
        let dir = TemporaryDirectory()
        let target = dir.write("old contents that are longer", to: "f")
        try AtomicFile.write(Array("new".utf8), to: target, mode: 0o600)
        #expect(try String(contentsOfFile: target, encoding: .utf8) == "new")
        #expect(mode(of: target) == 0o600)
        #expect(dir.snapshot().keys.sorted() == ["f"])
    }
}
