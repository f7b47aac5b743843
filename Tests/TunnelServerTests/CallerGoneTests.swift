import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelServer
@testable import TunnelWire

/// Stands for a caller that has closed its socket while the server has not read its EOF yet: the first write
/// fails (EPIPE on a Unix socket) and NIO closes the channel right there, inside the write, firing
/// `channelInactive` before the writer's next line runs.
final class ClosedPeerSocket: ChannelOutboundHandler {
    typealias OutboundIn = Any
    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        promise?.fail(ChannelError.ioOnClosedChannel)
        context.close(promise: nil)
    }
}

/// Issue 25, finding 5: callers that give up during the dial. 400 callers on the Unix socket that sent `CONNECT`
/// and closed 0–4 ms later left 20 streams, and 20 target connections on the agent, open for good. Every
/// frontend opens its streams through ``StreamDialer``, which ties them to the caller's channel.
@Suite struct CallerGoneTests {
    /// Through ``ConnectHandler`` and through Host routing.
    @Test(arguments: [
        "CONNECT edge-7:10250 HTTP/1.1\r\nHost: edge-7:10250\r\n\r\n",
        "GET /metrics HTTP/1.1\r\nHost: edge-7:10255\r\n\r\n",
    ])
    func aCallerThatClosesDuringTheDialCancelsTheOpenAtOnce(request: String) throws {
        let fixture = try RouterFixture()
        let budget = try #require(fixture.core.limits.processBudget)
        try fixture.send(request)
        let (_, id) = try fixture.openAsked()
        #expect(fixture.mux.streamCount == 1 && budget.inUse > 0)

        try fixture.caller.close().wait()
        let frames = try fixture.framesToAgent()
        #expect(
            frames.map(\.type) == [.rst] && frames.first?.streamID == id, "frames to the agent: \(frames.map(\.type))")
        #expect(fixture.mux.streamCount == 0)
        #expect(fixture.mux.pendingOpens == 0)
        #expect(budget.inUse == 0, "the cancelled stream's window was not given back")

        // The agent's OPEN_OK crossed the RST: dropped (the RST answers it); the tunnel is not at fault.
        try fixture.agentAnswers(OpenOK(window: 1 << 20).frame(streamID: id))
        #expect(try fixture.framesToAgent().isEmpty)
        #expect(fixture.mux.streamCount == 0 && budget.inUse == 0)
        #expect(fixture.tunnel.isActive)
    }

    /// The race behind the leak: the caller has closed, but the server sees that only when its 200 fails. The
    /// channel is then closed before the stream's glue is added, and the glue never learns it. `halfClosedFirst`:
    /// the caller's EOF was read during the dial (a half-close, no reason to give up: it may wait for its answer).
    @Test(arguments: [false, true])
    func aCallerGoneWhenItsAnswerIsWrittenLeavesNoStreamBehind(halfClosedFirst: Bool) throws {
        let fixture = try RouterFixture()
        let budget = try #require(fixture.core.limits.processBudget)
        try fixture.caller.pipeline.syncOperations.addHandler(ClosedPeerSocket(), position: .first)
        try fixture.send("CONNECT edge-7:10250 HTTP/1.1\r\nHost: edge-7:10250\r\n\r\n")
        let (_, id) = try fixture.openAsked()
        if halfClosedFirst {
            fixture.caller.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
            #expect(try fixture.framesToAgent().isEmpty)
            #expect(fixture.caller.isActive)
        }

        try fixture.agentAnswers(OpenOK(window: 1 << 20).frame(streamID: id))
        #expect(!fixture.caller.isActive)
        let frames = try fixture.framesToAgent()
        #expect(frames.last?.type == .rst && frames.last?.streamID == id, "frames to the agent: \(frames.map(\.type))")
        #expect(fixture.mux.streamCount == 0, "the stream outlived its caller")
        #expect(fixture.mux.pendingOpens == 0)
        #expect(budget.inUse == 0, "the stream's window was not given back")
    }
}
