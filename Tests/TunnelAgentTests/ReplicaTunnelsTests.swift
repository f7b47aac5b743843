import NIOCore
import Testing
import TunnelWire

@testable import TunnelAgent

/// How long an agent waits before probing the Service again after reaching only replicas it holds.
@Suite struct ReplicaTunnelsTests {
    @Test func theServersPaceIsKeptWithinHalfEitherSide() {
        var seen: Set<Int64> = []
        for _ in 0..<2_000 {
            let wait = ReplicaTunnels.wait(afterDuplicates: 7, pace: 4_000).nanoseconds / 1_000_000
            #expect((2_000...6_000).contains(wait))
            seen.insert(wait / 1_000)
        }
        // Jittered, so that 10,000 agents that lost a replica in one second do not probe in step.
        #expect(seen.count >= 3)
    }

    @Test func withoutAPaceTheWaitGrowsToTenSeconds() {
        let first = (0..<500).map { _ in ReplicaTunnels.wait(afterDuplicates: 1, pace: nil).nanoseconds }
        let later = (0..<500).map { _ in ReplicaTunnels.wait(afterDuplicates: 30, pace: nil).nanoseconds }
        #expect(first.allSatisfy { (0...500_000_000).contains($0) })
        #expect(later.allSatisfy { (0...10_000_000_000).contains($0) })
        #expect(later.max()! > 5_000_000_000)
    }

    @Test func aPaceOutsideTheBoundsIsClampedHereToo() {
        // The parser clamps already; the wait must not trap (Int64.random on an empty range) if it ever gets one.
        for pace: Int64 in [-5, 0, 1, .max / 2, .max] {
            let wait = ReplicaTunnels.wait(afterDuplicates: 1, pace: pace).nanoseconds / 1_000_000
            #expect(wait >= 125 && wait <= 450_000, "\(pace)")
        }
    }
}

/// After a server of the previous protocol version refused the agent's HELLO.
@Suite struct OlderProtocolTests {
    @Test func theAgentSpeaksThePreviousVersionForTenMinutesThenItsOwnAgain() {
        let refusedAt = NIODeadline.now()
        let until = refusedAt + EdgeTunnelAgent.olderProtocolPeriod
        #expect(EdgeTunnelAgent.helloVersion(olderProtocolUntil: nil, now: refusedAt) == tunnelProtocolVersion)
        #expect(EdgeTunnelAgent.helloVersion(olderProtocolUntil: until, now: refusedAt) == oldestAgentProtocolVersion)
        #expect(
            EdgeTunnelAgent.helloVersion(olderProtocolUntil: until, now: refusedAt + .minutes(9))
                == oldestAgentProtocolVersion)
        // The servers may have been rolled forward again: the next dial tries this build's version (and falls
        // back again, for another ten minutes, if it is refused again).
        #expect(
            EdgeTunnelAgent.helloVersion(olderProtocolUntil: until, now: refusedAt + .minutes(10))
                == tunnelProtocolVersion)
        #expect(tunnelProtocolVersion > oldestAgentProtocolVersion)
    }
}
