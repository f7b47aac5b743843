import Foundation
import NIOConcurrencyHelpers
import NIOCore
import TunnelPKI

/// What stands before a join's token check and CSR signing: a rate limit per source address, and the tokens
/// kept in memory (re-read only when `tokens.json` changes), so that a flood of joins costs neither a disk read
/// nor a signature each. Thread-safe.
final class JoinGuard: @unchecked Sendable {
    /// Joins accepted from one source address per window; more are refused until the window passes.
    let perSource: Int
    let window: TimeAmount
    private let store: TokenStore
    private let lock = NIOLock()
    private var tokens: [StoredToken] = []
    private var stamp: [Int]?
    private var attempts: [String: (count: Int, since: NIODeadline)] = [:]
    private var lastPrune = NIODeadline.uptimeNanoseconds(0)
    /// Sources tracked at once; past it (after forgetting expired ones, at most once a window) new sources are
    /// refused until the window passes, so the table cannot grow without bound.
    static let maxSources = 10_000

    init(store: TokenStore, perSource: Int = 50, window: TimeAmount = .seconds(10)) {
        self.store = store
        self.perSource = perSource
        self.window = window
    }

    /// Counts a join attempt from `source` (an IPv6 source by its /64: one host owns many addresses); false
    /// when it is over the limit.
    func admit(_ source: String, now: NIODeadline = .now()) -> Bool {
        let source = Self.key(source)
        return lock.withLock {
            if attempts[source] == nil && attempts.count >= Self.maxSources {
                if now - lastPrune >= window {
                    lastPrune = now
                    attempts = attempts.filter { now - $0.value.since < window }
                }
                guard attempts.count < Self.maxSources else { return false }
            }
            var entry = attempts[source] ?? (0, now)
            if now - entry.since >= window { entry = (0, now) }
            entry.count += 1
            attempts[source] = entry
            return entry.count <= perSource
        }
    }

    static func key(_ source: String) -> String {
        guard let address = IPAddress(source), !address.isIPv4 else { return source }
        return IPAddress(bytes: address.bytes.prefix(8) + [UInt8](repeating: 0, count: 8))!.description + "/64"
    }

    private var external: (@Sendable () -> [StoredToken])?

    /// Takes the tokens from `source` (the Kubernetes objects a watch keeps) instead of `tokens.json`.
    func useTokens(_ source: @escaping @Sendable () -> [StoredToken]) {
        lock.withLock { external = source }
    }

    /// Verifies a presented token against the stored ones, re-reading `tokens.json` only when it changed.
    func verify(_ presented: String) throws -> StoredToken {
        if let external = lock.withLock({ external }) {
            return try TokenStore.verify(presented, among: external())
        }
        let current = AtomicFile.stamp(store.path)
        let known: [StoredToken] = try lock.withLock {
            if stamp != current {
                tokens = try store.list()
                stamp = current
            }
            return tokens
        }
        return try TokenStore.verify(presented, among: known)
    }
}
