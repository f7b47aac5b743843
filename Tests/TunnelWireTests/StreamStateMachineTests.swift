import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelWire

/// Drives ``StreamStateMachine`` frame by frame: every received frame in every state, legal or not.
@Suite struct StreamStateMachineTests {
    typealias State = StreamStateMachine.State
    typealias Received = StreamStateMachine.Received

    /// A machine brought into `state` by legal steps.
    func machine(_ state: State, openedBy opener: StreamStateMachine.Opener) throws -> StreamStateMachine {
        var machine = StreamStateMachine(openedBy: opener)
        switch state {
        case .opening: break
        case .open, .halfClosedLocal, .halfClosedRemote:
            if opener == .local {
                try machine.receive(.openOK)
            } else {
                let answered = machine.sendOpenOK()
                #expect(answered)
            }
            if state == .halfClosedLocal {
                let finished = machine.sendFin()
                #expect(finished)
            }
            if state == .halfClosedRemote { try machine.receive(.fin) }
        case .closed: machine.reset()
        }
        #expect(machine.state == state)
        return machine
    }

    /// What each received frame does in each state: the next state, or nil for a protocol error.
    static let table: [(StreamStateMachine.Opener, State, Received, State?)] = {
        var rows: [(StreamStateMachine.Opener, State, Received, State?)] = []
        for opener in [StreamStateMachine.Opener.local, .remote] {
            let opensHere = opener == .local
            rows += [
                (opener, .opening, .openOK, opensHere ? .open : nil),
                (opener, .opening, .openFail, opensHere ? .closed : nil),
                (opener, .opening, .data, nil),
                (opener, .opening, .window, nil),
                (opener, .opening, .fin, nil),
                (opener, .opening, .rst, .closed),
                (opener, .open, .data, .open),
                (opener, .open, .window, .open),
                (opener, .open, .fin, .halfClosedRemote),
                (opener, .open, .rst, .closed),
                (opener, .open, .openOK, nil),
                (opener, .open, .openFail, nil),
                (opener, .halfClosedLocal, .data, .halfClosedLocal),
                (opener, .halfClosedLocal, .window, .halfClosedLocal),
                (opener, .halfClosedLocal, .fin, .closed),
                (opener, .halfClosedLocal, .rst, .closed),
                (opener, .halfClosedLocal, .openOK, nil),
                (opener, .halfClosedLocal, .openFail, nil),
                (opener, .halfClosedRemote, .data, nil),
                (opener, .halfClosedRemote, .window, .halfClosedRemote),
                (opener, .halfClosedRemote, .fin, nil),
                (opener, .halfClosedRemote, .rst, .closed),
                (opener, .halfClosedRemote, .openOK, nil),
                (opener, .halfClosedRemote, .openFail, nil),
                (opener, .closed, .data, nil),
                (opener, .closed, .window, nil),
                (opener, .closed, .fin, nil),
                (opener, .closed, .rst, .closed),
                (opener, .closed, .openOK, nil),
                (opener, .closed, .openFail, nil),
            ]
        }
        return rows
    }()

    @Test(arguments: 0..<table.count)
    func everyReceivedFrameInEveryState(row: Int) throws {
        let (opener, state, frame, next) = Self.table[row]
        var machine = try machine(state, openedBy: opener)
        if let next {
            try machine.receive(frame)
            #expect(machine.state == next, "\(opener) \(state) + \(frame)")
        } else {
            #expect(throws: FrameError.self, "\(opener) \(state) + \(frame) must be a protocol error") {
                try machine.receive(frame)
            }
        }
    }

    @Test func localStepsAreRefusedWhereTheStateDoesNotAllowThem() throws {
        var server = StreamStateMachine(openedBy: .local)
        let answered = server.sendOpenOK()
        #expect(!answered)  // only the side that received OPEN answers it
        let finBeforeOpen = server.sendFin()
        #expect(!finBeforeOpen && !server.canSend)  // nothing is sent before OPEN_OK
        var agent = try machine(.halfClosedLocal, openedBy: .remote)
        let secondFin = agent.sendFin()
        #expect(!secondFin && !agent.canSend)  // one FIN
        var finished = try machine(.halfClosedRemote, openedBy: .remote)
        #expect(finished.canSend)
        let lastFin = finished.sendFin()
        #expect(lastFin && finished.isClosed)
    }

    @Test func theReasonNamesTheFrameAndTheState() throws {
        var machine = try machine(.halfClosedRemote, openedBy: .local)
        do {
            try machine.receive(.data)
            Issue.record("DATA after FIN was accepted")
        } catch let error as FrameError {
            #expect(error.description == "DATA on a stream that is already finished by the peer (FIN)")
        }
    }
}

/// The mux checks every frame against its stream's state: illegal frames close the connection with a reason.
@Suite struct TunnelMuxStateTests {
    let helper = TunnelMuxTests()

    func openedAgent() throws -> (EmbeddedChannel, TunnelMux) {
        let (channel, mux, _) = try helper.makeMux(.agent)
        try channel.writeInbound(Open(target: "127.0.0.1:10250", window: 1 << 20).frame(streamID: 1))
        mux.acceptStream(1)
        _ = try helper.outbound(channel)
        return (channel, mux)
    }

    @Test func dataOnAStreamNeverOpenedIsAProtocolError() throws {
        let (channel, _) = try openedAgent()
        var payload = ByteBuffer()
        payload.writeString("x")
        #expect(throws: FrameError.self) { try channel.writeInbound(Frame(type: .data, streamID: 3, payload: payload)) }
    }

    @Test func dataAfterTheFinIsAProtocolErrorAndDataAfterAResetIsDropped() throws {
        var payload = ByteBuffer()
        payload.writeString("x")
        let (channel, mux) = try openedAgent()
        try channel.writeInbound(Frame.fin(streamID: 1, allocator: channel.allocator))
        #expect(throws: FrameError.self) { try channel.writeInbound(Frame(type: .data, streamID: 1, payload: payload)) }

        let (other, otherMux) = try openedAgent()
        otherMux.cancelStream(1)  // our RST crosses the peer's DATA
        try other.writeInbound(Frame(type: .data, streamID: 1, payload: payload))
        #expect(otherMux.streamCount == 0 && other.isActive)  // dropped, the connection goes on
        #expect(mux.streamCount == 0 && !channel.isActive)  // the protocol error closed the first one
    }

    @Test func aSecondOpenOKIsAProtocolError() throws {
        let (channel, mux, _) = try helper.makeMux(.server)
        _ = mux.openStream(target: "edge-1:10250")
        _ = try helper.outbound(channel)
        try channel.writeInbound(OpenOK(window: 1024).frame(streamID: 1))
        #expect(throws: FrameError.self) { try channel.writeInbound(OpenOK(window: 1024).frame(streamID: 1)) }
    }

    @Test func anAgentSendsNothingOfAStreamBeforeItsOpenOK() throws {
        let (channel, mux, _) = try helper.makeMux(.agent)
        try channel.writeInbound(Open(target: "127.0.0.1:10250", window: 1 << 20).frame(streamID: 1))
        var banner = ByteBuffer()
        banner.writeString("SSH-2.0-target-speaks-first\r\n")
        mux.dataFromSocket(1, banner)  // the target spoke before the dial was reported
        #expect(try helper.outbound(channel).isEmpty)
        mux.acceptStream(1)
        #expect(try helper.outbound(channel).map(\.type) == [.openOK, .data])
    }

    @Test func drainingIsAnEventWhenTheLastStreamEnds() throws {
        let (channel, mux) = try openedAgent()
        var idle = false
        mux.whenIdle().whenSuccess { idle = true }
        #expect(!idle)
        try channel.writeInbound(Frame.rst(streamID: 1, code: .cancel, allocator: channel.allocator))
        #expect(idle)
        var again = false
        mux.whenIdle().whenSuccess { again = true }
        #expect(again)  // already idle: at once
    }
}
