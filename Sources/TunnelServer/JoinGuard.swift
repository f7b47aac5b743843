import Foundation
import NIOConcurrencyHelpers
import NIOCore
import TunnelPKI
import TunnelSupport

/// What stands before a join's token check and CSR signing: a rate limit per source address, and the tokens
/// kept in memory (re-read only when `tokens.json` changes), so that a flood of joins costs neither a disk read
/// nor a signature each. Thread-safe.
final class JoinGuard: @unchecked Sendable {
    /// Joins accepted from one source address per window; more are refused until the window passes.
    var perSource: Int { sources.perKey }
    var window: TimeAmount { sources.window }
    private let sources: WindowedLimit
    private let store: TokenStore
    private let lock = NIOLock()
    private var tokens: [StoredToken] = []
    private var stamp: [Int]?
    /// Sources tracked at once (``WindowedLimit/maxKeys``).
    static let maxSources = WindowedLimit.maxKeys

    init(store: TokenStore, perSource: Int = 50, window: TimeAmount = .seconds(10)) {
        self.store = store
        self.sources = WindowedLimit(perKey: perSource, window: window)
    }

    /// Counts a join attempt from `source` (an IPv6 source by its /64: one host owns many addresses); false
    /// when it is over the limit.
    func admit(_ source: String, now: NIODeadline = .now()) -> Bool {
        sources.admit(SourceKey.of(source), now: now)
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
