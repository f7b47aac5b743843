import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// `coordination.k8s.io/v1` Leases as the count of server replicas (as konnectivity counts its servers): each
/// replica holds a Lease named after it, labelled `LABEL`, renewed every ``renewInterval``; the number of Leases
/// with that label whose renewal has not expired is the count. The Leases are listed, then watched from the
/// list's resourceVersion; a watch that ends is resumed from the last version seen, a 410 Gone (the version
/// was compacted away) relists, and errors back off (1 s doubling to 30 s, jittered). Expiry is no event, so
/// the count is recomputed every second.
public final class ReplicaLeases: @unchecked Sendable {
    public let client: KubeClient
    public let namespace: String
    public let serverID: String
    public let label: (key: String, value: String)
    public let duration: Int
    public let renewInterval: TimeAmount
    private let logger: Logger
    private let onCount: @Sendable (Int) -> Void
    private let lock = NIOLock()
    private var leases: [String: (renew: Date, duration: Int)] = [:]
    private var lastCount = 0

    public init(
        client: KubeClient, namespace: String, serverID: String, label: (key: String, value: String),
        duration: Int = 15, renewInterval: TimeAmount = .seconds(5), logger: Logger, onCount: @escaping @Sendable (Int) -> Void
    ) {
        self.client = client
        self.namespace = namespace
        self.serverID = serverID
        self.label = label
        self.duration = duration
        self.renewInterval = renewInterval
        self.logger = logger
        self.onCount = onCount
    }

    var collection: String { "/apis/coordination.k8s.io/v1/namespaces/\(namespace)/leases" }
    var selector: String { "labelSelector=\(label.key)%3D\(label.value)" }
    var leaseName: String { "edge-tunnel-server-\(serverID)" }

    /// Renews the own Lease and follows all of them until the task is cancelled; then deletes the own Lease, so
    /// that the others count one replica fewer at once.
    public func run() async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.renewLoop() }
            group.addTask { await self.followLoop() }
            group.addTask { await self.countLoop() }
        }
        // Run outside the cancelled task: its requests would be cancelled at once.
        let (client, path) = (client, "\(collection)/\(leaseName)")
        _ = await Task { try? await client.request(.DELETE, path, timeout: .seconds(3)) }.value
    }

    // MARK: Renewing

    private func renewLoop() async {
        while !Task.isCancelled {
            do {
                try await renew()
            } catch {
                if Task.isCancelled { return }
                logger.warning("cannot renew Lease \(namespace)/\(leaseName): \(error)")
            }
            try? await Task.sleep(nanoseconds: UInt64(renewInterval.nanoseconds))
        }
    }

    func renew() async throws {
        let now = Self.microTime(Date())
        let path = "\(collection)/\(leaseName)"
        let existing = try await client.request(.GET, path)
        var lease: [String: Any]
        switch existing.status {
        case 200:
            guard let object = try JSONSerialization.jsonObject(with: Data(existing.body)) as? [String: Any] else {
                throw KubeClient.Failure(description: "Lease \(leaseName) is not a JSON object")
            }
            lease = object
        case 404:
            lease = [
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": ["name": leaseName, "namespace": namespace, "labels": [label.key: label.value]],
                "spec": ["holderIdentity": serverID, "acquireTime": now],
            ]
        default:
            throw Self.failure(existing, "GET \(path)")
        }
        var spec = lease["spec"] as? [String: Any] ?? [:]
        spec["holderIdentity"] = serverID
        spec["leaseDurationSeconds"] = duration
        spec["renewTime"] = now
        lease["spec"] = spec
        let body = Array(try JSONSerialization.data(withJSONObject: lease))
        let answer = existing.status == 404
            ? try await client.request(.POST, collection, body: body)
            : try await client.request(.PUT, path, body: body)
        // 409: another writer (or our previous renewal) changed it meanwhile; the next round reads it anew.
        guard (200...201).contains(answer.status) || answer.status == 409 else {
            throw Self.failure(answer, "\(existing.status == 404 ? "POST" : "PUT") \(path)")
        }
    }

    // MARK: Following

    private func followLoop() async {
        var failures = 0
        while !Task.isCancelled {
            do {
                var version = try await list()
                failures = 0
                // Watch from the list's version until the version is gone (410), then list again.
                while !Task.isCancelled {
                    guard let next = try await watch(from: version) else {
                        logger.info("the Lease watch's version is gone (410): listing again")
                        try? await Task.sleep(nanoseconds: UInt64.random(in: 100_000_000...1_000_000_000))
                        break
                    }
                    version = next
                }
            } catch {
                if Task.isCancelled { return }
                failures += 1
                let ceiling = min(30_000, 1_000 << min(failures - 1, 5))
                logger.warning("following the replica Leases: \(error); again within \(ceiling / 1000) s")
                try? await Task.sleep(nanoseconds: UInt64(Int.random(in: ceiling / 2...ceiling)) * 1_000_000)
            }
        }
    }

    /// Lists the Leases; returns the list's resourceVersion.
    func list() async throws -> String {
        let answer = try await client.request(.GET, "\(collection)?\(selector)")
        guard answer.status == 200 else { throw Self.failure(answer, "list Leases in \(namespace)") }
        guard let object = try JSONSerialization.jsonObject(with: Data(answer.body)) as? [String: Any],
            let items = object["items"] as? [[String: Any]]
        else { throw KubeClient.Failure(description: "the Lease list is not a list") }
        var fresh: [String: (renew: Date, duration: Int)] = [:]
        for item in items {
            if let (name, entry) = Self.entry(item) { fresh[name] = entry }
        }
        lock.withLock { leases = fresh }
        recount()
        return (object["metadata"] as? [String: Any])?["resourceVersion"] as? String ?? ""
    }

    /// Watches from `version`; returns the last version seen when the server ended the watch, nil after 410.
    func watch(from version: String) async throws -> String? {
        let last = NIOLockedValueBox(version)
        let gone = NIOLockedValueBox(false)
        let status = try await client.watch(
            "\(collection)?\(selector)&watch=1&allowWatchBookmarks=true&resourceVersion=\(version)&timeoutSeconds=60",
            timeout: .seconds(75)
        ) { [weak self] line in
            guard let self, let event = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any],
                let type = event["type"] as? String, let object = event["object"] as? [String: Any]
            else { return }
            if type == "ERROR" {
                if object["code"] as? Int == 410 { gone.withLockedValue { $0 = true } }
                return
            }
            if let rv = (object["metadata"] as? [String: Any])?["resourceVersion"] as? String {
                last.withLockedValue { $0 = rv }
            }
            guard type != "BOOKMARK", let (name, entry) = Self.entry(object) else { return }
            self.lock.withLock {
                if type == "DELETED" { self.leases[name] = nil } else { self.leases[name] = entry }
            }
            self.recount()
        }
        if status == 410 || gone.withLockedValue({ $0 }) { return nil }
        guard status == 200 else {
            throw KubeClient.Failure(description: "watching Leases in \(namespace): HTTP \(status)")
        }
        return last.withLockedValue { $0 }
    }

    // MARK: Counting

    private func countLoop() async {
        while !Task.isCancelled {
            recount()
            try? await Task.sleep(nanoseconds: 1_000_000_000)
        }
    }

    /// The replicas whose Lease is current; at least 1 (this one).
    public var count: Int {
        let now = Date()
        return max(1, lock.withLock { leases.values.filter { $0.renew.addingTimeInterval(Double($0.duration)) > now }.count })
    }

    private func recount() {
        let current = count
        let changed = lock.withLock { () -> Bool in
            defer { lastCount = current }
            return current != lastCount
        }
        if changed { onCount(current) }
    }

    // MARK: JSON

    static func entry(_ lease: [String: Any]) -> (String, (renew: Date, duration: Int))? {
        guard let name = (lease["metadata"] as? [String: Any])?["name"] as? String,
            let spec = lease["spec"] as? [String: Any], let renewText = spec["renewTime"] as? String,
            let renew = parseMicroTime(renewText)
        else { return nil }
        return (name, (renew, spec["leaseDurationSeconds"] as? Int ?? 15))
    }

    /// Kubernetes MicroTime: RFC 3339 with microseconds (`2026-11-30T16:40:05.123456Z`).
    static func microTime(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.string(from: date).replacingOccurrences(of: "Z", with: "000Z")
    }

    static func parseMicroTime(_ text: String) -> Date? {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        // Foundation takes milliseconds at most: drop the extra fraction digits.
        if let dot = text.firstIndex(of: "."), let end = text[dot...].firstIndex(where: { !$0.isNumber && $0 != "." }) {
            let fraction = text[text.index(after: dot)..<end]
            let trimmed = text[..<dot] + "." + fraction.prefix(3) + text[end...]
            return formatter.date(from: String(trimmed))
        }
        formatter.formatOptions = [.withInternetDateTime]
        return formatter.date(from: text)
    }

    static func failure(_ response: KubeClient.Response, _ what: String) -> KubeClient.Failure {
        // The API's Status object says why (403: which permission RBAC lacks).
        let message = (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any])?["message"] as? String
        return KubeClient.Failure(description: "\(what): HTTP \(response.status)\(message.map { ": \($0)" } ?? "")")
    }
}
