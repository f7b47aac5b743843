import Crypto
import Foundation
import TunnelPKI

/// Node IPs held across replicas. Each IP a join names is claimed with a ConfigMap of its own
/// (`edge-tunnel-ip-HASH`, label `edgetunnel.io/join-state=ip`), created before the node's record is written.
/// The API server lets exactly one create of a name succeed, so two joins naming one IP through two replicas at
/// the same moment cannot both pass: the second finds the first's claim. The records a replica has seen are
/// still checked first (``NodeRecord/joining``); the claims close the gap between two replicas' views.
///
/// A claim stands while its node holds the IP (joined, not revoked, the IP in its record), and for
/// ``claimGrace`` after it was made, since that join may still be writing its record. A reset or a revocation
/// deletes the node's claims at once. A claim whose node never finished its join (or whose deletion failed) is
/// taken over after the grace by the next node that names the IP.
extension KubeJoinState {
    struct IPClaim: Codable, Equatable {
        var node: String
        var ip: String
        var claimed: Date
    }

    /// How long a claim stands even if its node's record does not hold the IP yet (or any more).
    static let claimGrace: TimeInterval = 60

    static func ipObjectName(_ ip: String) -> String {
        "edge-tunnel-ip-" + Array(SHA256.hash(data: Array(ip.utf8))).hexString.prefix(20)
    }

    /// Claims each of `ips` for `node`; returns those claimed now (not held by `node` before), for
    /// ``release(_:of:)`` if the join fails. Throws when another node holds one: the claims made so far are
    /// released.
    func claim(_ ips: [String], for node: String, now: Date) async throws -> [String] {
        var claimed: [String] = []
        do {
            for ip in ips where try await claim(ip, for: node, now: now) { claimed.append(ip) }
        } catch {
            await release(claimed, of: node)
            throw error
        }
        return claimed
    }

    /// True when the claim was written now, false when `node` held it already.
    private func claim(_ ip: String, for node: String, now: Date) async throws -> Bool {
        let objectName = Self.ipObjectName(ip)
        let path = "\(collection)/\(objectName)"
        let claim = IPClaim(node: node, ip: ip, claimed: now)
        for _ in 0..<8 {
            let created = try await client.request(
                .POST, collection, body: try configMap(objectName, kind: "ip", key: "claim", value: claim))
            if (200...201).contains(created.status) { return true }
            guard created.status == 409 else { throw KubeWatch.failure(created, "claiming node IP \(ip)") }
            let current = try await client.request(.GET, path)
            if current.status == 404 { continue }  // released meanwhile: create again
            guard current.status == 200 else { throw KubeWatch.failure(current, "reading the claim of node IP \(ip)") }
            guard var object = try JSONSerialization.jsonObject(with: Data(current.body)) as? [String: Any],
                let held: IPClaim = decode(object as [String: any Sendable], key: "claim"), held.ip == ip
            else {
                throw KubeClient.Failure(
                    description:
                        "ConfigMap \(namespace)/\(objectName) does not hold a valid claim of node IP \(ip): fix or delete it"
                )
            }
            if held.node != node, now.timeIntervalSince(held.claimed) < Self.claimGrace {
                throw PKIError(
                    .alreadyExists, "node IP \(ip) is being claimed by node \(held.node): try again in a minute")
            }
            if held.node != node, let holder = try await currentRecord(of: held.node), holder.joined != nil,
                holder.revoked == nil, holder.ips.contains(ip)
            {
                throw PKIError(.alreadyExists, "node IP \(ip) belongs to node \(held.node)")
            }
            // Our own claim is renewed (its grace starts again: a node re-joining after a reset is between claim
            // and record as much as a new one); another's, whose holder was reset or revoked or never finished its
            // join, is taken over. Either only if no other replica changed it meanwhile (409: read again).
            var data = object["data"] as? [String: Any] ?? [:]
            data["claim"] = try Self.json(claim)
            object["data"] = data
            let taken = try await client.request(
                .PUT, path, body: Array(try JSONSerialization.data(withJSONObject: object)))
            if taken.status == 409 { continue }
            guard taken.status == 200 else { throw KubeWatch.failure(taken, "taking over the claim of node IP \(ip)") }
            return held.node != node
        }
        throw PKIError(.writeFailed, "the claim of node IP \(ip) in \(location) keeps changing: try again")
    }

    /// Deletes `node`'s claims of `ips` (a join that failed or was undone, a reset, a revocation), each only as
    /// it was read (a precondition on its resourceVersion: one taken over meanwhile stays). Best effort: a claim
    /// left behind is taken over once its grace has passed. With `claimedBefore`, only claims made up to then: a
    /// re-join of the node that claimed again after a reset keeps its claim.
    func release(_ ips: [String], of node: String, claimedBefore: Date? = nil) async {
        for ip in ips {
            let path = "\(collection)/\(Self.ipObjectName(ip))"
            guard let current = try? await client.request(.GET, path), current.status == 200,
                let object = try? JSONSerialization.jsonObject(with: Data(current.body)) as? [String: any Sendable],
                let held: IPClaim = decode(object, key: "claim"), held.node == node,
                claimedBefore.map({ held.claimed <= $0 }) ?? true,
                let version = (object["metadata"] as? [String: any Sendable])?["resourceVersion"] as? String,
                let options = try? JSONSerialization.data(withJSONObject: [
                    "kind": "DeleteOptions", "apiVersion": "v1", "preconditions": ["resourceVersion": version],
                ])
            else { continue }
            _ = try? await client.request(.DELETE, path, body: Array(options))
        }
    }

    /// The node's record as the API server holds it now (not this replica's cache, which may lag).
    private func currentRecord(of node: String) async throws -> NodeRecord? {
        let answer = try await client.request(.GET, "\(collection)/\(Self.nodeObjectName(node))")
        if answer.status == 404 { return nil }
        guard answer.status == 200 else { throw KubeWatch.failure(answer, "reading the record of node \(node)") }
        guard let object = try JSONSerialization.jsonObject(with: Data(answer.body)) as? [String: any Sendable] else {
            return nil
        }
        return record(object)
    }
}
