import NIOCore
import Testing

@testable import TunnelWire

/// The pace a replica asks of agents already holding it follows the probes it receives.
@Suite struct ReplicaProbePacerTests {
    func at(_ seconds: Double) -> NIODeadline { .uptimeNanoseconds(UInt64(1_000_000_000 + seconds * 1e9)) }

    @Test func thePaceStartsAtTheCeilingAndFollowsTheRateOnceTheFleetHasRampedUp() {
        let pacer = ReplicaProbePacer(target: 100)
        let ceiling = TimeAmount.seconds(8)
        #expect(pacer.pace(now: at(0), ceiling: ceiling) == ceiling)
        // Half the target rate in the first second: agents are still spreading their first probes, so the
        // rate undercounts them and the pace stays.
        for i in 1..<49 { #expect(pacer.pace(now: at(Double(i) / 50), ceiling: ceiling) == ceiling) }
        #expect(pacer.pace(now: at(1), ceiling: ceiling) == ceiling)
        // Past the ramp-up, a rate under the target shortens the pace by at most a quarter a window.
        #expect(pacer.pace(now: at(7), ceiling: ceiling) == .seconds(6))
        #expect(pacer.pace(now: at(8), ceiling: ceiling) == .milliseconds(4500))
        #expect(pacer.pace(now: at(9), ceiling: ceiling) == .milliseconds(3375))
        // A storm at four times the target after the trickle brought the pace down: as soon as a window's worth
        // of probes (100) has come, the pace goes up in one step, to the ceiling at most.
        for i in 1...100 { #expect(pacer.pace(now: at(9 + Double(i) / 400), ceiling: ceiling) == .milliseconds(3375)) }
        #expect(pacer.pace(now: at(9 + 101.0 / 400), ceiling: ceiling) == ceiling)
        // A storm began: for its ramp-up, a quiet window does not shorten the pace.
        #expect(pacer.pace(now: at(12), ceiling: ceiling) == ceiling)
        #expect(pacer.pace(now: at(16), ceiling: ceiling) == .seconds(6))
    }

    @Test func aTrickleOfProbesGetsTheFloorAndAQuietSpellStartsAgainAtTheCeiling() {
        let pacer = ReplicaProbePacer(target: 1000)
        let ceiling = TimeAmount.seconds(4)
        var pace = pacer.pace(now: at(0), ceiling: ceiling)
        for second in 1...15 { pace = pacer.pace(now: at(Double(second)), ceiling: ceiling) }
        #expect(pace == ReplicaProbePacer.floor)
        #expect(pacer.pace(now: at(30), ceiling: ceiling) == ceiling)
        // The ceiling is never under the floor, and a smaller ceiling caps a pace already given.
        #expect(ReplicaProbePacer(target: 10).pace(now: at(0), ceiling: .zero) == ReplicaProbePacer.floor)
        #expect(pacer.pace(now: at(30.5), ceiling: .seconds(1)) == .seconds(1))
    }

    /// A model of the fleet after a replica restarts: `agents` all miss replica 0, which is back in the Service,
    /// and probe through a Service that picks one of `replicas` at random. An agent that reaches a held replica
    /// waits that replica's pace, ±50% (``ReplicaTunnels``). Returns the seconds until every agent found it and the
    /// most probes one replica received in one second.
    func restart(agents: Int, replicas: Int = 3, target: Int = 1000, adaptive: Bool) -> (seconds: Double, peak: Int) {
        var random = SplitMix(seed: 7)
        let pacers = (0..<replicas).map { _ in ReplicaProbePacer(target: target) }
        let ceiling = TimeAmount.nanoseconds(Int64(Double(agents) / Double(target * replicas) * 1e9))
        let step = 0.01
        var due = [[Int]](repeating: [], count: 200_000)  // agents by the step of their next probe
        for agent in 0..<agents { due[Int(random.unit() * 5 / step)].append(agent) }  // first probes over 5 s
        var looking = agents
        var perSecond = [Int: Int]()
        for tick in due.indices {
            let now = Double(tick) * step
            for _ in due[tick] {
                let replica = Int(random.unit() * Double(replicas))
                perSecond[replicas * Int(now) + replica, default: 0] += 1
                if replica == 0 {
                    looking -= 1
                    if looking == 0 { return (now, perSecond.values.max() ?? 0) }
                    continue
                }
                let pace = adaptive ? pacers[replica].pace(now: at(now), ceiling: ceiling) : ceiling
                let wait = Double(pace.nanoseconds) / 1e9 * (0.5 + random.unit())
                due[min(due.count - 1, tick + max(1, Int(wait / step)))].append(0)
            }
        }
        return (.infinity, perSecond.values.max() ?? 0)
    }

    @Test func tenThousandAgentsFindARestartedReplicaWithinAMinuteAtTheTargetRate() {
        let adaptive = restart(agents: 10_000, adaptive: true)
        let fixed = restart(agents: 10_000, adaptive: false)
        // The pace sized to every agent leaves a tail (the fraction still looking falls by a third per pace:
        // 88 s in this model); following the probes ends it well within the 60 s (22 s), and no replica
        // receives more probes in any second than with the fixed pace, about the target.
        #expect(fixed.seconds > 60)
        #expect(adaptive.seconds < 40)
        #expect(adaptive.peak <= fixed.peak + fixed.peak / 10)
        #expect(adaptive.peak <= 1100)
        // A small fleet finds it within a few paces of the floor.
        #expect(restart(agents: 20, adaptive: true).seconds < 12)
    }
}

/// A seeded generator, so the model's outcome is the same on every run.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    mutating func unit() -> Double { Double(next() >> 11) / Double(1 << 53) }
}
