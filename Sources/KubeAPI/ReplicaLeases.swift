import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// `coordination.k8s.io/v1` Leases as the count of server replicas (as konnectivity counts its servers): each
/// replica holds a Lease named after it, labelled `LABEL`, renewed every ``renewInterval``; the number of Leases
/// with that label that a replica holds and whose renewal has not expired is the count, followed by a
/// ``KubeWatch``. Expiry is no event, so the count is recomputed every second.
///
/// Whoever may write Leases in the namespace could otherwise inflate the count, or keep a dead replica counted.
/// A Lease counts only as a replica writes it (``counts(_:at:)``): named `edge-tunnel-server-<holder>` after the
/// replica that holds it, and renewed within its duration, at most ``longestLease``, by the writer's clock and
/// by the time this replica saw it change (as client-go's leader election does). The count is at most
/// ``maxCount``, the most replicas `--server-count` and the agents take.
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
    private var leases: [String: Entry] = [:]
    private var lastCount = 0

    /// The most replicas counted, as `--server-count` allows and the agents clamp.
    public static let maxCount = 1000
    /// The longest a Lease counts after its renewal, whatever its `leaseDurationSeconds` says: replicas write
    /// ``duration`` (15 s), so a Lease claiming hours keeps a dead replica counted for a minute at most.
    public static let longestLease: TimeInterval = 60
    /// How far the clocks of two replicas may differ before a current Lease stops counting.
    public static let clockSkew: TimeInterval = 3

    /// What the count reads of one Lease.
    struct Entry: Equatable {
        /// `metadata.name`.
        var name: String
        /// `spec.holderIdentity`; nil or empty: not held.
        var holder: String?
        /// `spec.renewTime`, by the writer's clock.
        var renew: Date
        /// `spec.leaseDurationSeconds`.
        var duration: Int
        /// When this replica saw this version of the Lease: listed, added or modified.
        var observed: Date
    }

    public init(
        client: KubeClient, namespace: String, serverID: String, label: (key: String, value: String),
        duration: Int = 15, renewInterval: TimeAmount = .seconds(5), logger: Logger,
        onCount: @escaping @Sendable (Int) -> Void
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
    var leaseName: String { Self.leaseName(of: serverID) }

    /// The name of the Lease replica `serverID` holds.
    static func leaseName(of serverID: String) -> String { "edge-tunnel-server-\(serverID)" }

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
            var wait = renewInterval
            do {
                try await renew()
            } catch {
                if Task.isCancelled { return }
                logger.warning("cannot renew Lease \(namespace)/\(leaseName): \(error)")
                // The API server said when to ask again (429, 5xx): then, not a whole interval later.
                if let retryAfter = (error as? KubeClient.Failure)?.retryAfter { wait = min(wait, retryAfter) }
            }
            try? await Task.sleep(nanoseconds: UInt64(max(wait.nanoseconds, 0)))
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
            throw KubeWatch.failure(existing, "GET \(path)")
        }
        var spec = lease["spec"] as? [String: Any] ?? [:]
        spec["holderIdentity"] = serverID
        spec["leaseDurationSeconds"] = duration
        spec["renewTime"] = now
        lease["spec"] = spec
        let body = Array(try JSONSerialization.data(withJSONObject: lease))
        let answer =
            existing.status == 404
            ? try await client.request(.POST, collection, body: body)
            : try await client.request(.PUT, path, body: body)
        // 409: another writer (or our previous renewal) changed it meanwhile; the next round reads it anew.
        guard (200...201).contains(answer.status) || answer.status == 409 else {
            throw KubeWatch.failure(answer, "\(existing.status == 404 ? "POST" : "PUT") \(path)")
        }
    }

    // MARK: Following

    private func followLoop() async {
        let watch = KubeWatch(
            client: client, path: collection, query: selector, what: "the replica Leases", logger: logger)
        await watch.run { [weak self] change in
            guard let self else { return }
            self.apply(change)
            self.recount()
        }
    }

    /// Takes one change of the watch, seen at `now`.
    func apply(_ change: KubeWatch.Change, at now: Date = Date()) {
        lock.withLock {
            switch change {
            case .listed(let items):
                leases = Dictionary(
                    items.compactMap { Self.entry($0, observed: now) }.map { ($0.name, $0) }, uniquingKeysWith: { $1 })
            case .added(let lease), .modified(let lease):
                if let entry = Self.entry(lease, observed: now) {
                    leases[entry.name] = entry
                } else if let name = Self.name(of: lease) {
                    leases[name] = nil  // no longer a Lease that can count (its renewal removed)
                }
            case .deleted(let lease):
                if let name = Self.name(of: lease) { leases[name] = nil }
            }
        }
    }

    // MARK: Counting

    private func countLoop() async {
        while !Task.isCancelled {
            recount()
            try? await Task.sleep(nanoseconds: 1_000_000_000)
        }
    }

    /// The replicas whose Lease is current; at least 1 (this one), at most ``maxCount``.
    public var count: Int { count(at: Date()) }

    func count(at now: Date) -> Int {
        let current = lock.withLock { leases.values.filter { Self.counts($0, at: now) }.count }
        return min(max(1, current), Self.maxCount)
    }

    /// Whether a Lease counts as a replica at `now`: it is held, named after its holder as replicas name their
    /// Lease, and renewed within its duration (at most ``longestLease``, with ``clockSkew`` to spare). The
    /// renewal is taken at the writer's `renewTime` or when this replica saw the Lease change, whichever is
    /// earlier: a `renewTime` in the future (a writer's clock ahead, or a forged one) counts from the moment the
    /// Lease was seen, and a dead replica's Lease listed anew does not count again.
    static func counts(_ lease: Entry, at now: Date) -> Bool {
        guard let holder = lease.holder, !holder.isEmpty, lease.name == leaseName(of: holder), lease.duration > 0 else {
            return false
        }
        let renewed = min(lease.renew, lease.observed)
        let lasts = min(TimeInterval(lease.duration), longestLease) + clockSkew
        return now < renewed.addingTimeInterval(lasts)
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

    /// What the count reads of a Lease seen at `observed`; nil without a name or a renewal time.
    static func entry(_ lease: [String: any Sendable], observed: Date) -> Entry? {
        guard let name = name(of: lease), let spec = lease["spec"] as? [String: Any],
            let renewText = spec["renewTime"] as? String, let renew = parseMicroTime(renewText)
        else { return nil }
        return Entry(
            name: name, holder: spec["holderIdentity"] as? String, renew: renew,
            duration: spec["leaseDurationSeconds"] as? Int ?? 15, observed: observed)
    }

    static func name(of lease: [String: any Sendable]) -> String? {
        (lease["metadata"] as? [String: Any])?["name"] as? String
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
}
