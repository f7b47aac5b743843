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

    init(store: TokenStore, perSource: Int = 50, window: TimeAmount = .seconds(10)) {
        self.store = store
        self.perSource = perSource
        self.window = window
    }

    /// Counts a join attempt from `source`; false when it is over the limit.
    func admit(_ source: String, now: NIODeadline = .now()) -> Bool {
        lock.withLock {
            if attempts.count > 10_000 {  // forget sources whose window has passed
                attempts = attempts.filter { now - $0.value.since < window }
            }
            var entry = attempts[source] ?? (0, now)
            if now - entry.since >= window { entry = (0, now) }
            entry.count += 1
            attempts[source] = entry
            return entry.count <= perSource
        }
    }

    /// Verifies a presented token against the stored ones, re-reading `tokens.json` only when it changed.
    func verify(_ presented: String) throws -> StoredToken {
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
