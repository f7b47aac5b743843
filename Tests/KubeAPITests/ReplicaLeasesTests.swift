import Foundation
import Logging
import NIOPosix
import Testing

@testable import KubeAPI

/// The replica count from the Leases: only Leases a replica holds and keeps renewing count. Whoever may write Leases
/// in the namespace cannot add replicas with Leases no replica holds, nor keep a dead one counted.
@Suite struct ReplicaLeasesTests {
    static let now = Date(timeIntervalSince1970: 1_800_000_000)

    /// Leases driven with watch changes, as their watch would drive them; the client is never used.
    static func leases() throws -> ReplicaLeases {
        let client = try KubeClient(
            config: KubeConfig(host: "127.0.0.1", port: 1), group: MultiThreadedEventLoopGroup.singleton)
        return ReplicaLeases(
            client: client, namespace: "kube-system", serverID: "r0", label: ("k8s-app", "edge-tunnel-server"),
            logger: Logger(label: "replica-leases-test"), onCount: { _ in })
    }

    /// A Lease as `holder` writes it (renewed `age` seconds ago), or as anyone else may.
    static func lease(
        _ name: String, holder: String?, renewedAgo age: TimeInterval, duration: Int? = 15
    ) -> [String: any Sendable] {
        var spec: [String: any Sendable] = ["renewTime": ReplicaLeases.microTime(now.addingTimeInterval(-age))]
        if let holder { spec["holderIdentity"] = holder }
        if let duration { spec["leaseDurationSeconds"] = duration }
        return [
            "metadata": ["name": name, "labels": ["k8s-app": "edge-tunnel-server"]] as [String: any Sendable],
            "spec": spec,
        ]
    }

    @Test func onlyHeldCurrentLeasesNamedAfterTheirHolderCount() throws {
        let leases = try Self.leases()
        leases.apply(
            .listed([
                Self.lease("edge-tunnel-server-r0", holder: "r0", renewedAgo: 2),
                Self.lease("edge-tunnel-server-r1", holder: "r1", renewedAgo: 10),
                Self.lease("edge-tunnel-server-r2", holder: "r2", renewedAgo: 40),  // expired: a dead replica
                Self.lease("edge-tunnel-server-r3", holder: nil, renewedAgo: 1),  // held by nobody
                Self.lease("edge-tunnel-server-r4", holder: "", renewedAgo: 1),
                Self.lease("edge-tunnel-server-r5", holder: "r1", renewedAgo: 1),  // not named after its holder
                Self.lease("someone-elses-lease", holder: "someone-elses-lease", renewedAgo: 1),
                // A day: 60 s at most.
                Self.lease("edge-tunnel-server-r6", holder: "r6", renewedAgo: 600, duration: 86_400),
                Self.lease("edge-tunnel-server-r7", holder: "r7", renewedAgo: 1, duration: 0),
            ]), at: Self.now)
        #expect(leases.count(at: Self.now) == 2)
        // r1's Lease expires 15 s after its renewal, with 3 s for the clocks: 8 s from now.
        #expect(leases.count(at: Self.now.addingTimeInterval(7)) == 2)
        #expect(leases.count(at: Self.now.addingTimeInterval(9)) == 1)
    }

    @Test func aRenewalInTheFutureCountsFromWhenTheLeaseWasSeen() throws {
        let leases = try Self.leases()
        // Written with renewTime an hour ahead (a clock ahead, or forged): it counts as renewed when it was seen.
        leases.apply(.added(Self.lease("edge-tunnel-server-r1", holder: "r1", renewedAgo: -3600)), at: Self.now)
        leases.apply(.added(Self.lease("edge-tunnel-server-r0", holder: "r0", renewedAgo: 0)), at: Self.now)
        #expect(leases.count(at: Self.now.addingTimeInterval(1)) == 2)
        // r0 renews 25 s later, r1 is not written again: it no longer counts, whatever its renewTime claims.
        let later = Self.now.addingTimeInterval(25)
        leases.apply(.modified(Self.lease("edge-tunnel-server-r0", holder: "r0", renewedAgo: -25)), at: later)
        #expect(leases.count(at: later.addingTimeInterval(5)) == 1)

        // A dead replica's Lease listed again (a watch that lost its version) does not count again: it was seen
        // now, but renewed two minutes ago.
        leases.apply(
            .listed([
                Self.lease("edge-tunnel-server-r0", holder: "r0", renewedAgo: 0),
                Self.lease("edge-tunnel-server-r2", holder: "r2", renewedAgo: 120),
            ]), at: Self.now)
        #expect(leases.count(at: Self.now) == 1)
    }

    @Test func theCountStopsAtTheMostReplicasTheAgentsTake() throws {
        let leases = try Self.leases()
        leases.apply(
            .listed((0..<1_500).map { Self.lease("edge-tunnel-server-r\($0)", holder: "r\($0)", renewedAgo: 1) }),
            at: Self.now)
        #expect(leases.count(at: Self.now) == ReplicaLeases.maxCount)
    }
}
