import NIOCore
import Testing

@testable import TunnelWire

/// When a tunnel is dead and when to PING it, for both ends.
@Suite struct KeepaliveTests {
    let start = NIODeadline.uptimeNanoseconds(1_000_000_000_000)
    func at(_ seconds: Int64) -> NIODeadline { start + .seconds(seconds) }

    @Test func theAgentPingsEveryIntervalWhateverElseFlows() {
        var rule = Keepalive(interval: .seconds(5), deadAfter: .seconds(15), pingOnlyWhenQuiet: false, now: start)
        var pings: [Int64] = []
        for second: Int64 in 1...20 where rule.check(now: at(second), lastFrame: at(second)) == .ping { pings.append(second) }
        #expect(pings == [5, 10, 15, 20])
    }

    @Test func theServerPingsOnlyAQuietTunnel() {
        var rule = Keepalive(interval: .seconds(5), deadAfter: .seconds(15), pingOnlyWhenQuiet: true, now: start)
        // Frames keep arriving (the agent's own PINGs): no PING of ours on top.
        for second in stride(from: 5, through: 30, by: 5) {
            #expect(rule.check(now: at(Int64(second)), lastFrame: at(Int64(second) - 1)) == .nothing)
        }
        #expect(rule.check(now: at(35), lastFrame: at(30)) == .ping)
    }

    @Test func silencePastTheDeadlineIsDeathForBoth() {
        for quiet in [false, true] {
            var rule = Keepalive(interval: .seconds(5), deadAfter: .seconds(15), pingOnlyWhenQuiet: quiet, now: start)
            #expect(rule.check(now: at(15), lastFrame: at(0)) != .dead)  // exactly the deadline: not yet
            #expect(rule.check(now: at(16), lastFrame: at(0)) == .dead)
        }
    }
}
