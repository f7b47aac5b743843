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
        for second: Int64 in 1...20 where rule.check(now: at(second), lastFrame: at(second)) == .ping {
            pings.append(second)
        }
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

    func atMs(_ ms: Int64) -> NIODeadline { start + .milliseconds(ms) }

    /// Issue 26: while data moves, a lost path is found within 1.5 s (three 500-ms PINGs unanswered), not 9 s.
    @Test func whileDataMovesTheAgentPingsOftenAndASilentPathIsDeadWithinASecondAndAHalf() {
        var rule = Keepalive(
            interval: .seconds(3), deadAfter: .seconds(9), pingOnlyWhenQuiet: false, active: .standard,
            now: start)
        // The tunnel was idle for 2.9 s (its last PONG then): becoming active is not judged by that quiet.
        #expect(rule.check(now: atMs(2900), lastFrame: atMs(0), isActive: true) == .ping)
        var pings = 1
        var dead: Int64?
        for ms in stride(from: Int64(3000), through: 8000, by: 100) {
            switch rule.check(now: atMs(ms), lastFrame: atMs(0), isActive: true) {
            case .ping: pings += 1
            case .dead: dead = dead ?? ms
            case .nothing: break
            }
            if dead != nil { break }
        }
        #expect(dead == 4500)  // the first check past 1.5 s after it became active, nothing having come since
        #expect(pings == 4)  // at 0, 0.5, 1.0 and 1.5 s: every 500 ms meanwhile
    }

    @Test func whileDataMovesAndFramesArriveThereIsNoFailover() {
        var rule = Keepalive(
            interval: .seconds(3), deadAfter: .seconds(9), pingOnlyWhenQuiet: false, active: .standard,
            now: start)
        // A slow line: each PONG comes 1.1 s after its PING (a 400-ms queue and more); frames arrive meanwhile.
        for ms in stride(from: Int64(0), through: 60_000, by: 100) {
            let lastFrame = atMs(max(0, ms - 1100))
            #expect(rule.check(now: atMs(ms), lastFrame: lastFrame, isActive: true) != .dead)
        }
    }

    /// A path with a long round trip gets the time its own retransmissions need (review of issue 26): a one-second
    /// blip on a 300-ms path must not be called a loss.
    @Test func aLongRoundTripPathIsGivenItsRetransmissionTime() {
        var rule = Keepalive(
            interval: .seconds(3), deadAfter: .seconds(9), pingOnlyWhenQuiet: false, active: .standard,
            now: start)
        let path = SocketTuning.PathTiming(sinceLastAck: .zero, baseRTO: .milliseconds(500), rtt: .milliseconds(300))
        #expect(rule.check(now: atMs(0), lastFrame: atMs(0), isActive: true, lossAtLeast: path.shortestLoss) == .ping)
        #expect(
            rule.check(now: atMs(1700), lastFrame: atMs(0), isActive: true, lossAtLeast: path.shortestLoss) != .dead)
        #expect(
            rule.check(now: atMs(1900), lastFrame: atMs(0), isActive: true, lossAtLeast: path.shortestLoss) == .dead)
    }

    @Test func anIdleTunnelKeepsTheIdleRule() {
        var rule = Keepalive(
            interval: .seconds(3), deadAfter: .seconds(9), pingOnlyWhenQuiet: false, active: .standard,
            now: start)
        #expect(rule.check(now: at(5), lastFrame: at(0), isActive: false) == .ping)
        #expect(rule.check(now: at(9), lastFrame: at(0), isActive: false) != .dead)
        #expect(rule.check(now: at(10), lastFrame: at(0), isActive: false) == .dead)
    }
}
