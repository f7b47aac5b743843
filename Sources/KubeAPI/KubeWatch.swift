import Foundation
import Logging
import NIOCore

/// Keeps a local view of some Kubernetes objects, as client-go's informers do: list, then watch from the list's
/// resourceVersion; a watch that ends (or whose connection is cut mid-stream) is resumed from the last version
/// seen, a 410 Gone (the version was compacted away) lists again, and failures back off (1 s doubling to 30 s,
/// jittered). An ERROR event other than 410 (an etcd timeout, a 500, a 429) is a failure too: the client waits
/// before it lists and watches again, instead of asking at once in a loop. An event, or a watch that the API
/// server ends on its own, starts the backoff over. Runs until its task is cancelled.
public struct KubeWatch: Sendable {
    /// Where the lists and watches go: the ``KubeClient`` (a scripted stand-in in the tests).
    let transport: any KubeWatchTransport
    /// The collection (`/api/v1/namespaces/NS/services`).
    public let path: String
    /// Selectors, already URL-encoded (`labelSelector=k8s-app%3Dx`, `fieldSelector=metadata.name%3Dy`).
    public let query: String
    public let what: String
    let logger: Logger
    /// Waits that many nanoseconds, or less if the task is cancelled (the tests record the waits instead).
    let pause: @Sendable (UInt64) async -> Void

    public init(client: KubeClient, path: String, query: String, what: String, logger: Logger) {
        self.init(transport: client, path: path, query: query, what: what, logger: logger)
    }

    init(
        transport: any KubeWatchTransport, path: String, query: String, what: String, logger: Logger,
        pause: @escaping @Sendable (UInt64) async -> Void = { nanoseconds in
            _ = try? await Task.sleep(nanoseconds: nanoseconds)
        }
    ) {
        self.transport = transport
        self.path = path
        self.query = query
        self.what = what
        self.logger = logger
        self.pause = pause
    }

    public enum Change: Sendable {
        /// Every object as listed: the view is replaced.
        case listed([[String: any Sendable]])
        case added([String: any Sendable])
        case modified([String: any Sendable])
        case deleted([String: any Sendable])
    }

    public func run(_ onChange: @escaping @Sendable (Change) -> Void) async {
        let backoff = WatchBackoff()
        while !Task.isCancelled {
            do {
                var version = try await list(onChange)
                while !Task.isCancelled {
                    guard let next = try await watch(from: version, backoff: backoff, onChange) else {
                        logger.info("the watch of \(what) lost its version (410 Gone): listing again")
                        await pause(UInt64.random(in: 100_000_000...1_000_000_000))
                        break
                    }
                    version = next
                }
            } catch {
                if Task.isCancelled { return }
                if let wait = (error as? KubeClient.Failure)?.retryAfter {  // the API server said when (429, 5xx)
                    logger.warning(
                        "following \(what): \(error); again in \(wait.nanoseconds / 1_000_000) ms, as it asked")
                    await pause(UInt64(max(wait.nanoseconds, 0)))
                    continue
                }
                let ceiling = backoff.failed()
                logger.warning("following \(what): \(error); again within \(ceiling / 1000) s")
                await pause(UInt64(Int.random(in: ceiling / 2...ceiling)) * 1_000_000)
            }
        }
    }

    /// Lists; returns the list's resourceVersion.
    func list(_ onChange: @Sendable (Change) -> Void) async throws -> String {
        let list = try await transport.list("\(path)?\(query)", what: what)
        onChange(.listed(list.items))
        return list.version
    }

    /// Watches from `version`; returns the last version seen when the server ended the watch or the stream was
    /// cut (``KubeClient/Failure/cutMidAnswer``), nil after 410. An ERROR event other than 410 ends the watch at
    /// once with an error. Every other event, and a watch that the server ends on its own, tells `backoff` that the
    /// API server answers again.
    func watch(
        from version: String, backoff: WatchBackoff, _ onChange: @escaping @Sendable (Change) -> Void
    ) async throws -> String? {
        let state = WatchState(version: version)
        let what = self.what
        let started = ContinuousClock.now
        let onEvent: @Sendable ([UInt8]) throws -> Void = { line in
            guard let event = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: any Sendable],
                let type = event["type"] as? String, let object = event["object"] as? [String: any Sendable]
            else { return }
            if type == "ERROR" {
                guard object["code"] as? Int == 410 else { throw KubeWatch.errorEvent(object, watching: what) }
                state.gone()
                return
            }
            backoff.succeeded()
            state.event()
            if let rv = (object["metadata"] as? [String: any Sendable])?["resourceVersion"] as? String { state.saw(rv) }
            switch type {
            case "ADDED": onChange(.added(object))
            case "MODIFIED": onChange(.modified(object))
            case "DELETED": onChange(.deleted(object))
            default: break  // BOOKMARK: only its version counts
            }
        }
        var cut: KubeClient.Failure?
        let status: Int
        do {
            status = try await transport.watch(
                "\(path)?\(query)&watch=1&allowWatchBookmarks=true&resourceVersion=\(version)&timeoutSeconds=60",
                timeout: .seconds(75), onEvent: onEvent)
        } catch let failure as KubeClient.Failure where failure.cutMidAnswer {
            // A stream cut mid-answer (a reset, a proxy going away) ends the watch as the API server's end does, as
            // client-go takes it: the events before the cut were applied, so the next watch starts from the last
            // version seen, with no list. A cut with no event within a second is a failure, as below.
            (status, cut) = (200, failure)
        }
        if status == 410 || state.isGone { return nil }
        guard status == 200 else { throw KubeClient.Failure(description: "watching \(what): HTTP \(status)") }
        // A watch the API server (or a proxy) ends at once with no event, cleanly or not, is a failure: watching
        // again at once would be the hot loop an ERROR event was.
        guard state.sawEvent || ContinuousClock.now - started >= Self.shortestWatch else {
            let why = cut.map { " (\($0))" } ?? ""
            throw KubeClient.Failure(
                description: "the watch of \(what) ended with no event after less than a second\(why)")
        }
        if let cut {
            logger.info("the watch of \(what) was cut (\(cut)): watching again from version \(state.version)")
        }
        backoff.succeeded()  // the watch ran until the API server ended it
        return state.version
    }

    /// A watch that ends sooner than this without an event counts as a failure.
    static let shortestWatch = Duration.seconds(1)

    /// The failure an ERROR event stands for, with the Status object's code, reason and message.
    static func errorEvent(_ status: [String: any Sendable], watching what: String) -> KubeClient.Failure {
        let code = (status["code"] as? Int).map { " \($0)" } ?? ""
        let reason = (status["reason"] as? String).map { " \($0)" } ?? ""
        let message = (status["message"] as? String).map { ": \($0)" } ?? ""
        return KubeClient.Failure(
            description: "the watch of \(what) ended with an ERROR event\(code)\(reason)\(message)")
    }

    /// The API's Status object says why a request failed (403: which permission RBAC lacks).
    public static func failure(_ response: KubeClient.Response, _ what: String) -> KubeClient.Failure {
        let message =
            (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any])?["message"] as? String
        return KubeClient.Failure(
            description: "\(what): HTTP \(response.status)\(message.map { ": \($0)" } ?? "")",
            retryAfter: response.retryAfter)
    }
}

/// What a watch asks of the API server: a list and a watch (``KubeClient``; a scripted stand-in in the tests).
protocol KubeWatchTransport: Sendable {
    func list(_ pathAndQuery: String, what: String) async throws -> (items: [[String: any Sendable]], version: String)
    func watch(
        _ path: String, timeout: TimeAmount, onEvent: @escaping @Sendable ([UInt8]) throws -> Void
    ) async throws -> Int
}

extension KubeClient: KubeWatchTransport {}

/// How long a watch waits after a failure: 1 s, doubling with each failure in a row up to 30 s; the caller
/// jitters it (half of it to all of it). An event, or a watch that ran its course, starts it over. Written from
/// the event loop (events) and the watching task (failures).
final class WatchBackoff: @unchecked Sendable {
    static let first = 1_000
    static let ceiling = 30_000
    private let lock = NSLock()
    private var failures = 0

    /// Counts a failure; returns the longest wait before the next attempt, in milliseconds.
    func failed() -> Int {
        lock.withLock { () -> Int in
            failures += 1
            return min(Self.ceiling, Self.first << min(failures - 1, 5))
        }
    }

    /// The API server answered: the next failure waits the shortest time again.
    func succeeded() {
        lock.withLock { failures = 0 }
    }
}

/// The last version a watch saw, and whether it ended with 410; written from the event loop, read after.
private final class WatchState: @unchecked Sendable {
    private let lock = NSLock()
    private var _version: String
    private var _gone = false
    private var _sawEvent = false
    init(version: String) { _version = version }
    func event() { lock.withLock { _sawEvent = true } }
    var sawEvent: Bool { lock.withLock { _sawEvent } }
    func saw(_ version: String) { lock.withLock { _version = version } }
    func gone() { lock.withLock { _gone = true } }
    var version: String { lock.withLock { _version } }
    var isGone: Bool { lock.withLock { _gone } }
}

extension KubeClient {
    /// Items asked for per page of a list: each answer stays far below ``maxBody`` (16 MiB), however many
    /// objects the collection holds (a ConfigMap per joined node; Nodes of a large cluster).
    static let pageSize = 500
    /// A list whose continue token expired (410) is started again this many times at most.
    static let listRestarts = 3
    /// Pages of one list at most, and objects (what is held in memory at once).
    static let maxPages = 10_000
    static let maxListItems = 1_000_000

    /// GETs a collection page by page (`limit` and `continue`, one snapshot of the API server): its items and
    /// the list's resourceVersion (a watch starts from it). A continue token that expired (410) starts the list
    /// again. A status other than 200 throws the API's own reason (``KubeWatch/failure(_:_:)``); `what` names the
    /// collection in errors.
    func list(_ pathAndQuery: String, what: String) async throws -> (items: [[String: any Sendable]], version: String) {
        let separator = pathAndQuery.contains("?") ? "&" : "?"
        var restarts = 0
        var items: [[String: any Sendable]] = []
        var version = ""
        var next: String?
        var pages = 0
        while true {
            var query = "\(pathAndQuery)\(separator)limit=\(Self.pageSize)"
            if let next { query += "&continue=\(Self.queryValue(next))" }
            let answer = try await request(.GET, query)
            if answer.status == 410, next != nil, restarts < Self.listRestarts {
                restarts += 1  // the snapshot behind the token was compacted: a fresh list
                items = []
                next = nil
                pages = 0
                continue
            }
            guard answer.status == 200 else { throw KubeWatch.failure(answer, "listing \(what)") }
            guard let object = try JSONSerialization.jsonObject(with: Data(answer.body)) as? [String: any Sendable],
                let page = object["items"] as? [[String: any Sendable]]
            else { throw KubeClient.Failure(description: "the list of \(what) is not a list") }
            items += page
            guard items.count <= Self.maxListItems else {
                throw KubeClient.Failure(
                    description: "the list of \(what) holds more than \(Self.maxListItems) objects")
            }
            let metadata = object["metadata"] as? [String: any Sendable]
            version = metadata?["resourceVersion"] as? String ?? version
            next = (metadata?["continue"] as? String).flatMap { $0.isEmpty ? nil : $0 }
            // A page may hold fewer items than asked, even none (a label selector filters after paging); a
            // list that never ends is a broken server.
            pages += 1
            guard next == nil || pages < Self.maxPages else {
                throw KubeClient.Failure(description: "the list of \(what) did not end within \(Self.maxPages) pages")
            }
            if next == nil { return (items, version) }
        }
    }

    /// `text` percent-encoded for a query value (a continue token is base64: `+`, `/` and `=` must be escaped).
    static func queryValue(_ text: String) -> String {
        let allowed = CharacterSet(charactersIn: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
        return text.addingPercentEncoding(withAllowedCharacters: allowed) ?? text
    }
}
