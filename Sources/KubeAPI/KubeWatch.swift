import Foundation
import Logging

/// Keeps a local view of some Kubernetes objects, as client-go's informers do: list, then watch from the list's
/// resourceVersion; a watch that ends is resumed from the last version seen, a 410 Gone (the version was
/// compacted away) lists again, and errors back off (1 s doubling to 30 s, jittered). Runs until its task is
/// cancelled.
public struct KubeWatch: Sendable {
    public let client: KubeClient
    /// The collection (`/api/v1/namespaces/NS/services`).
    public let path: String
    /// Selectors, already URL-encoded (`labelSelector=k8s-app%3Dx`, `fieldSelector=metadata.name%3Dy`).
    public let query: String
    public let what: String
    let logger: Logger

    public init(client: KubeClient, path: String, query: String, what: String, logger: Logger) {
        self.client = client
        self.path = path
        self.query = query
        self.what = what
        self.logger = logger
    }

    public enum Change: Sendable {
        /// Every object as listed: the view is replaced.
        case listed([[String: any Sendable]])
        case added([String: any Sendable])
        case modified([String: any Sendable])
        case deleted([String: any Sendable])
    }

    public func run(_ onChange: @escaping @Sendable (Change) -> Void) async {
        var failures = 0
        while !Task.isCancelled {
            do {
                var version = try await list(onChange)
                failures = 0
                while !Task.isCancelled {
                    guard let next = try await watch(from: version, onChange) else {
                        logger.info("the watch of \(what) lost its version (410 Gone): listing again")
                        try? await Task.sleep(nanoseconds: UInt64.random(in: 100_000_000...1_000_000_000))
                        break
                    }
                    version = next
                }
            } catch {
                if Task.isCancelled { return }
                failures += 1
                let ceiling = min(30_000, 1_000 << min(failures - 1, 5))
                logger.warning("following \(what): \(error); again within \(ceiling / 1000) s")
                try? await Task.sleep(nanoseconds: UInt64(Int.random(in: ceiling / 2...ceiling)) * 1_000_000)
            }
        }
    }

    /// Lists; returns the list's resourceVersion.
    func list(_ onChange: @Sendable (Change) -> Void) async throws -> String {
        let list = try await client.list("\(path)?\(query)", what: what)
        onChange(.listed(list.items))
        return list.version
    }

    /// Watches from `version`; returns the last version seen when the server ended the watch, nil after 410.
    func watch(from version: String, _ onChange: @escaping @Sendable (Change) -> Void) async throws -> String? {
        let state = WatchState(version: version)
        let status = try await client.watch(
            "\(path)?\(query)&watch=1&allowWatchBookmarks=true&resourceVersion=\(version)&timeoutSeconds=60",
            timeout: .seconds(75)
        ) { line in
            guard let event = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: any Sendable],
                let type = event["type"] as? String, let object = event["object"] as? [String: any Sendable]
            else { return }
            if type == "ERROR" {
                if object["code"] as? Int == 410 { state.gone() }
                return
            }
            if let rv = (object["metadata"] as? [String: any Sendable])?["resourceVersion"] as? String { state.saw(rv) }
            switch type {
            case "ADDED": onChange(.added(object))
            case "MODIFIED": onChange(.modified(object))
            case "DELETED": onChange(.deleted(object))
            default: break  // BOOKMARK: only its version counts
            }
        }
        if status == 410 || state.isGone { return nil }
        guard status == 200 else { throw KubeClient.Failure(description: "watching \(what): HTTP \(status)") }
        return state.version
    }

    /// The API's Status object says why a request failed (403: which permission RBAC lacks).
    public static func failure(_ response: KubeClient.Response, _ what: String) -> KubeClient.Failure {
        let message = (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any])?["message"] as? String
        return KubeClient.Failure(description: "\(what): HTTP \(response.status)\(message.map { ": \($0)" } ?? "")")
    }
}

/// The last version a watch saw, and whether it ended with 410; written from the event loop, read after.
private final class WatchState: @unchecked Sendable {
    private let lock = NSLock()
    private var _version: String
    private var _gone = false
    init(version: String) { _version = version }
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
                throw KubeClient.Failure(description: "the list of \(what) holds more than \(Self.maxListItems) objects")
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
