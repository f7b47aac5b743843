import NIOConcurrencyHelpers
import NIOCore
import Testing

@testable import TunnelWire

/// A claim of PROTOCOL.md's "Resuming a tunnel" that no test from outside can time (issue 29): the moment between
/// the agent's registration on its new connection and the server's taking the old tunnel's streams over is too
/// short to aim a caller at. The end-to-end half (502 while suspended) is in IntegrationTests/test_claims.py.
@Suite struct ResumeClaimsTests {
    /// "Until the streams are taken over, no new stream is opened on the new tunnel (503, "resuming")". The server
    /// marks the new connection (``TunnelMux/beginTakeOver()``) before the agent is routable on it, then takes the
    /// suspended tunnel over. A caller in between gets 503 with the reason, and no OPEN goes to the agent (its id
    /// could collide with a taken-over stream's). Once the streams are taken over, the next stream opens, with an id
    /// above theirs.
    @Test func aNewStreamIsRefused503WhileATakeOverIsUnderWayAndOpensOnceItIsDone() throws {
        let pair = try ResumePair()
        let first = try pair.openStream()
        try pair.cut()
        let old = (server: pair.server.mux, agent: pair.agent.mux)
        pair.server = try pair.connection(.server)
        pair.agent = try pair.connection(.agent)
        pair.server.mux.beginTakeOver()

        let answer = NIOLockedValueBox<OpenResult?>(nil)
        pair.server.mux.openStream(target: "127.0.0.1:10250").whenSuccess { result in
            answer.withLockedValue { $0 = result }
        }
        pair.loop.run()
        guard case .failed(let failure)? = answer.withLockedValue({ $0 }) else {
            Issue.record("a stream was not refused during the takeover: \(String(describing: answer))")
            return
        }
        #expect(failure.code == 503)
        #expect(failure.reason == "the agent's tunnel is resuming: try again")
        #expect(try pair.server.channel.readOutbound(as: Frame.self) == nil, "no OPEN may go to the agent")

        #expect(pair.agent.mux.expectResume(from: old.agent))
        let taken = pair.server.mux.takeOver(old.server)
        pair.loop.run()
        #expect(try taken.wait() == 1)
        try pair.pump()
        let second = try pair.openStream()
        #expect(second > first)
        #expect(pair.callers.count == 2)
    }
}
