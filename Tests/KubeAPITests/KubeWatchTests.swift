import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Testing

@testable import KubeAPI

/// An API server that answers from a script: every list at once, with no items; each watch delivers the event
/// lines of its turn and ends (200). What was asked, and every wait the watch took, are kept in order. Once
/// `pausesWanted` waits were taken, the last one (and a watch past the script) lasts until the task is cancelled.
final class ScriptedWatchAPI: KubeWatchTransport, @unchecked Sendable {
    private let lock = NSLock()
    private var script: [[String]]
    private var _calls: [String] = []
    private var _pauses: [UInt64] = []
    private var _watchPaths: [String] = []
    /// Lists that fail first, with this failure (a 429 with Retry-After, say).
    private var listFailures: [KubeClient.Failure]
    let pausesWanted: Int
    /// A script line that is no event: the watch stays open a little over a second.
    static let quietSecond = "(quiet for a second)"
    /// A script line that is no event: the connection is lost there (a reset mid-stream), after the lines before it.
    static let cut = "(connection reset)"

    init(watches script: [[String]], pausesWanted: Int, listFailures: [KubeClient.Failure] = []) {
        self.script = script
        self.pausesWanted = pausesWanted
        self.listFailures = listFailures
    }

    /// The path and query of each watch, in order.
    var watchPaths: [String] { lock.withLock { _watchPaths } }

    /// `list`, `watch` and `pause`, in the order they happened.
    var calls: [String] { lock.withLock { _calls } }
    /// The waits asked for, in nanoseconds.
    var pauses: [UInt64] { lock.withLock { _pauses } }

    func list(_ pathAndQuery: String, what: String) async throws -> (items: [[String: any Sendable]], version: String) {
        let failure = lock.withLock { () -> KubeClient.Failure? in
            _calls.append("list")
            return listFailures.isEmpty ? nil : listFailures.removeFirst()
        }
        if let failure { throw failure }
        return ([], "1")
    }

    func watch(
        _ path: String, timeout: TimeAmount, onEvent: @escaping @Sendable ([UInt8]) throws -> Void
    ) async throws -> Int {
        let lines = lock.withLock { () -> [String]? in
            _calls.append("watch")
            _watchPaths.append(path)
            return script.isEmpty ? nil : script.removeFirst()
        }
        guard let lines else {
            try await Task.sleep(nanoseconds: 60_000_000_000)
            return 200
        }
        for line in lines {
            if line == ScriptedWatchAPI.quietSecond {  // a watch that stays open a while with nothing to say
                try await Task.sleep(nanoseconds: 1_100_000_000)
                continue
            }
            if line == ScriptedWatchAPI.cut {
                throw KubeClient.Failure(description: "read: Connection reset by peer", cutMidAnswer: true)
            }
            try onEvent(Array(line.utf8))
        }
        return 200
    }

    func pause(_ nanoseconds: UInt64) async {
        let enough = lock.withLock { () -> Bool in
            _calls.append("pause")
            _pauses.append(nanoseconds)
            return _pauses.count >= pausesWanted
        }
        if enough { try? await Task.sleep(nanoseconds: 60_000_000_000) }
    }
}

/// How a watch behaves when the API server fails it: it waits, longer each time in a row, and never asks again at
/// once (a hot loop against the API server).
@Suite struct KubeWatchTests {
    static let failed =
        #"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure","code":500,"reason":"InternalError","message":"etcdserver: request timed out"}}"#
    static let gone =
        #"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure","code":410,"reason":"Expired","message":"too old resource version"}}"#
    static let added = #"{"type":"ADDED","object":{"metadata":{"name":"a","resourceVersion":"7"}}}"#

    /// Runs a watch against `api` until it has taken `api.pausesWanted` waits (at most 10 s); the waits in seconds.
    func takenWaits(
        _ api: ScriptedWatchAPI, onChange: @escaping @Sendable (KubeWatch.Change) -> Void = { _ in }
    ) async throws -> [Double] {
        let watch = KubeWatch(
            transport: api, path: "/api/v1/namespaces/edge-tunnel/configmaps", query: "labelSelector=a%3Db",
            what: "the test objects", logger: Logger(label: "kube-watch-test"), pause: { await api.pause($0) })
        let task = Task { await watch.run(onChange) }
        var polls = 0
        while api.pauses.count < api.pausesWanted, polls < 2_000 {
            try await Task.sleep(nanoseconds: 5_000_000)
            polls += 1
        }
        task.cancel()
        await task.value
        return api.pauses.map { Double($0) / 1e9 }
    }

    @Test func anErrorEventBacksOffBeforeTheNextWatchAndAnEventStartsTheBackoffOver() async throws {
        let api = ScriptedWatchAPI(
            watches: [[Self.failed], [Self.failed], [Self.failed], [Self.added, Self.failed], [Self.failed]],
            pausesWanted: 5)
        let waits = try await takenWaits(api)
        // Every ERROR event is followed by a wait, then a list and a watch: never a watch right after a failed one.
        #expect(api.calls == Array([[String]](repeating: ["list", "watch", "pause"], count: 5).joined()))
        // 1 s, 2 s, 4 s (each jittered down to half); the event in the fourth watch starts it over.
        let expected: [ClosedRange<Double>] = [0.5...1, 1...2, 2...4, 0.5...1, 1...2]
        #expect(waits.count == expected.count)
        for (wait, range) in zip(waits, expected) { #expect(range.contains(wait), "waits \(waits)") }
    }

    @Test func a410ListsAgainSoonAndAWatchThatRanItsCourseStartsTheBackoffOver() async throws {
        let api = ScriptedWatchAPI(
            watches: [[Self.failed], [Self.failed], [Self.gone], [ScriptedWatchAPI.quietSecond], [Self.failed]],
            pausesWanted: 4)
        let waits = try await takenWaits(api)
        #expect(
            api.calls == [
                "list", "watch", "pause",  // failed: 0.5 to 1 s
                "list", "watch", "pause",  // failed again: 1 to 2 s
                "list", "watch", "pause",  // 410 Gone: listed again within a second, not counted as a failure
                "list", "watch",  // ended by the server without an error: the next watch follows at once
                "watch", "pause",  // failed: the backoff started over
            ])
        let expected: [ClosedRange<Double>] = [0.5...1, 1...2, 0.1...1, 0.5...1]
        #expect(waits.count == expected.count)
        for (wait, range) in zip(waits, expected) { #expect(range.contains(wait), "waits \(waits)") }
    }

    /// An API server (or a proxy before it) that ends every watch at once with 200 and no event made the client watch
    /// again at once, without end.
    @Test func aWatchEndedAtOnceWithNoEventBacksOffLikeAFailure() async throws {
        let api = ScriptedWatchAPI(watches: [[], [], []], pausesWanted: 3)
        let waits = try await takenWaits(api)
        #expect(api.calls == Array([[String]](repeating: ["list", "watch", "pause"], count: 3).joined()))
        let expected: [ClosedRange<Double>] = [0.5...1, 1...2, 2...4]
        #expect(waits.count == expected.count)
        for (wait, range) in zip(waits, expected) { #expect(range.contains(wait), "waits \(waits)") }
    }

    /// A watch whose connection is reset mid-stream (a proxy or an API server going away) ends as one the API server
    /// ended: the next watch starts at once from the last version seen, with no list (client-go does the same). The
    /// list and a wait were what the client did before.
    @Test func aWatchCutMidStreamIsResumedFromItsLastVersionWithNoList() async throws {
        let api = ScriptedWatchAPI(watches: [[Self.added, ScriptedWatchAPI.cut]], pausesWanted: 1)
        let task = Task { try await takenWaits(api) }
        var polls = 0
        while api.watchPaths.count < 2, polls < 1_000 {
            try await Task.sleep(nanoseconds: 5_000_000)
            polls += 1
        }
        task.cancel()
        _ = try? await task.value
        #expect(api.calls.prefix(3) == ["list", "watch", "watch"], "\(api.calls)")
        #expect(api.watchPaths.dropFirst().first?.contains("resourceVersion=7&") == true, "\(api.watchPaths)")
    }

    /// A watch cut at once with no event (a proxy dropping every watch) is a failure: the client backs off, 1 s
    /// doubling, instead of watching again at once without end.
    @Test func aWatchCutAtOnceWithNoEventBacksOffLikeAFailure() async throws {
        let api = ScriptedWatchAPI(
            watches: [[ScriptedWatchAPI.cut], [ScriptedWatchAPI.cut], [ScriptedWatchAPI.cut]], pausesWanted: 3)
        let waits = try await takenWaits(api)
        #expect(api.calls == Array([[String]](repeating: ["list", "watch", "pause"], count: 3).joined()))
        let expected: [ClosedRange<Double>] = [0.5...1, 1...2, 2...4]
        #expect(waits.count == expected.count)
        for (wait, range) in zip(waits, expected) { #expect(range.contains(wait), "waits \(waits)") }
    }

    @Test func theBackoffDoublesUpToThirtySecondsAndASuccessStartsItOver() {
        let backoff = WatchBackoff()
        #expect((0..<7).map { _ in backoff.failed() } == [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000])
        backoff.succeeded()
        #expect(backoff.failed() == 1_000)
    }

    @Test func anErrorEventSaysWhatTheAPIServerSaid() throws {
        let event = try JSONSerialization.jsonObject(with: Data(Self.failed.utf8)) as? [String: any Sendable]
        let status = try #require(event?["object"] as? [String: any Sendable])
        #expect(
            KubeWatch.errorEvent(status, watching: "the test objects").description
                == "the watch of the test objects ended with an ERROR event 500 InternalError: etcdserver: request timed out"
        )
    }

    /// A list refused with Retry-After (429 from API Priority and Fairness, or a 503) waits what the API server said,
    /// every time, instead of the backoff's 1 s doubling: after a long storm the client is back within a Retry-After.
    @Test func aRefusalWithRetryAfterWaitsThatLongNotTheBackoff() async throws {
        let throttled = KubeClient.Failure(description: "listing: HTTP 429", retryAfter: .seconds(3))
        let api = ScriptedWatchAPI(
            watches: [[Self.failed]], pausesWanted: 6, listFailures: Array(repeating: throttled, count: 5))
        let waits = try await takenWaits(api)
        #expect(waits == [3, 3, 3, 3, 3] + [waits.last!] && (0.5...1).contains(waits.last!), "waits \(waits)")
    }

    /// A BOOKMARK is no change of any object (its object is a bare kind with a resourceVersion): only the version the
    /// next watch starts from moves, to the bookmark's.
    @Test func aBookmarkMovesOnlyTheVersion() async throws {
        let bookmark =
            #"{"type":"BOOKMARK","object":{"kind":"Service","apiVersion":"v1","metadata":{"resourceVersion":"12","creationTimestamp":null},"spec":{},"status":{"loadBalancer":{}}}}"#
        let api = ScriptedWatchAPI(watches: [[Self.added, bookmark, ScriptedWatchAPI.quietSecond]], pausesWanted: 1)
        let changes = NIOLockedValueBox<[String]>([])
        let task = Task {
            try await takenWaits(api) { change in
                changes.withLockedValue { list in
                    switch change {
                    case .listed: list.append("listed")
                    case .added(let object):
                        list.append("added \((object["metadata"] as? [String: any Sendable])?["name"] ?? "")")
                    case .modified: list.append("modified")
                    case .deleted: list.append("deleted")
                    }
                }
            }
        }
        var polls = 0
        while api.watchPaths.count < 2, polls < 1_000 {
            try await Task.sleep(nanoseconds: 5_000_000)
            polls += 1
        }
        task.cancel()
        _ = try? await task.value
        #expect(changes.withLockedValue { $0 } == ["listed", "added a"])
        #expect(api.watchPaths.count >= 2)
        #expect(api.watchPaths.first?.contains("allowWatchBookmarks=true&resourceVersion=1&") == true)
        #expect(api.watchPaths.dropFirst().first?.contains("resourceVersion=12&") == true, "\(api.watchPaths)")
    }

    @Test func retryAfterIsHonouredOn429And5xxOnly() {
        #expect(KubeClient.retryAfter(status: 429, header: "2") == .seconds(2))
        #expect(KubeClient.retryAfter(status: 503, header: " 1 ") == .seconds(1))
        #expect(KubeClient.retryAfter(status: 500, header: "0") == .seconds(0))
        #expect(KubeClient.retryAfter(status: 429, header: "86400") == KubeClient.longestRetryAfter)
        #expect(KubeClient.retryAfter(status: 429, header: nil) == nil)
        #expect(KubeClient.retryAfter(status: 409, header: "2") == nil)
        #expect(KubeClient.retryAfter(status: 429, header: "Wed, 21 Oct 2015 07:28:00 GMT") == nil)
        #expect(KubeClient.retryAfter(status: 429, header: "-1") == nil)
    }
}
