import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelWire

/// A tunnel connection's life: every transition from every state, and the mux acting on it.
@Suite struct ConnectionStateMachineTests {
    typealias State = ConnectionStateMachine.State
    enum Event: CaseIterable { case drain, fail, suspend, close }

    func machine(in state: State) -> ConnectionStateMachine {
        var machine = ConnectionStateMachine()
        switch state {
        case .open: break
        case .draining: machine.drain()
        case .failed: machine.fail()
        case .suspended: _ = machine.suspend()
        case .closed: _ = machine.close()
        }
        #expect(machine.state == state)
        return machine
    }

    @Test func everyEventFromEveryState() {
        // (from, event) -> (to, did it change)
        let table: [(State, Event, State, Bool)] = [
            (.open, .drain, .draining, true), (.open, .fail, .failed, true), (.open, .suspend, .suspended, true),
            (.open, .close, .closed, true),
            (.draining, .drain, .draining, false), (.draining, .fail, .failed, true),
            (.draining, .suspend, .suspended, true), (.draining, .close, .closed, true),
            (.failed, .drain, .failed, false), (.failed, .fail, .failed, false), (.failed, .suspend, .failed, false),
            (.failed, .close, .closed, true),
            (.suspended, .drain, .suspended, false), (.suspended, .fail, .suspended, false),
            (.suspended, .suspend, .suspended, false), (.suspended, .close, .closed, true),
            (.closed, .drain, .closed, false), (.closed, .fail, .closed, false), (.closed, .suspend, .closed, false),
            (.closed, .close, .closed, false),
        ]
        #expect(table.count == 5 * Event.allCases.count)
        for (from, event, to, changed) in table {
            var machine = machine(in: from)
            let result: Bool
            switch event {
            case .drain: result = machine.drain()
            case .fail: result = machine.fail()
            case .suspend: result = machine.suspend()
            case .close: result = machine.close()
            }
            #expect(machine.state == to, "\(from) --\(event)--> \(machine.state), expected \(to)")
            #expect(result == changed, "\(from) --\(event)--> reported \(result)")
        }
    }

    @Test func whatEachStateAllows() {
        let allowed: [(State, frames: Bool, streams: Bool, ending: Bool)] = [
            (.open, true, true, false), (.draining, true, false, false), (.failed, false, false, true),
            (.suspended, false, false, false), (.closed, false, false, true),
        ]
        for (state, frames, streams, ending) in allowed {
            let machine = machine(in: state)
            #expect(
                machine.receivesFrames == frames && machine.opensStreams == streams && machine.isEnding == ending,
                "\(state)")
        }
    }

    @Test func aFailedConnectionIgnoresFramesAndOpensNoStream() throws {
        let helper = TunnelMuxTests()
        let (channel, mux, _) = try helper.makeMux(.server)
        var payload = ByteBuffer()
        payload.writeString("x")
        // DATA on a stream never opened: a protocol error, the connection fails and closes.
        #expect(throws: FrameError.self) { try channel.writeInbound(Frame(type: .data, streamID: 9, payload: payload)) }
        #expect(mux.connection.isEnding)
        _ = try helper.outbound(channel)
        try channel.writeInbound(Frame(type: .ping, streamID: 0, payload: ByteBuffer(bytes: [1, 2, 3, 4, 5, 6, 7, 8])))
        #expect(try helper.outbound(channel).isEmpty)  // no PONG: frames are ignored
        var answer: OpenResult?
        mux.openStream(target: "edge-1:10250").whenSuccess { answer = $0 }
        guard case .failed(let fail) = answer else {
            Issue.record("a stream opened on a failed connection: \(String(describing: answer))")
            return
        }
        #expect(fail.code == 502)
        #expect(try helper.outbound(channel).isEmpty)  // no OPEN written
    }

    @Test func aDrainingConnectionRefusesNewStreamsBothWays() throws {
        let helper = TunnelMuxTests()
        let (server, serverMux, _) = try helper.makeMux(.server)
        serverMux.drain(reason: "shutting down")
        #expect(try helper.outbound(server).map(\.type) == [.goaway])
        var answer: OpenResult?
        serverMux.openStream(target: "edge-1:10250").whenSuccess { answer = $0 }
        guard case .failed(let fail) = answer else {
            Issue.record("a stream opened while draining")
            return
        }
        #expect(fail.code == 503)

        let (agent, agentMux, _) = try helper.makeMux(.agent)
        agentMux.markDraining()
        try agent.writeInbound(Open(target: "127.0.0.1:10250", window: 1 << 20).frame(streamID: 1))
        #expect(try helper.outbound(agent).map(\.type) == [.openFail])
        #expect(agentMux.connection.state == .draining && agent.isActive)
    }
}
