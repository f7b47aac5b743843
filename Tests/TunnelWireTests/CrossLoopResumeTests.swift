import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing

@testable import TunnelWire

/// A takeover across event loops, as a server with several loops makes one (`--event-loop-threads`, the default on
/// any machine beyond 2 cores): the suspended tunnel's mux on one loop, the connection that resumes it on another,
/// and the caller's socket (its StreamGlue) on the old tunnel's loop, the new one's, or neither. Real loopback
/// sockets on a MultiThreadedEventLoopGroup, so every hop runs on its own thread as in production; ResumeTests run
/// everything on one EmbeddedEventLoop, where `inEventLoop` always holds and nothing ever hops (issue 25 item 4).
///
/// What crosses loops here:
/// - ``TunnelMux/takeOver(_:)``, called from the old loop as AgentSession does after `loseConnectionForResume()`:
///   `beginTakeOver` hops to the new loop, `handOver(to:)` runs on the old loop (`old.eventLoop.submit`), and the
///   streams are adopted on the new one (`hop(to:)`);
/// - `adopt` → ``StreamGlue/moveToTunnel(_:)``: the glue's mux is swapped on the glue's loop, after which its
///   `dataFromSocket`, `consumedBySocket`, `socketInputClosed`, ... hop to the new tunnel's loop, and the new mux's
///   `deliverFromTunnel`, `setPausedFromTunnel`, `finishOutputFromTunnel` hop to the glue's;
/// - a socket event still on its way to the old mux is passed on through `successor`, from the old loop to the new;
/// - the process's window and retained budgets: taken on the old loop, given back on the new one.
///
/// The agent's side stays on one loop: ``TunnelMux/expectResume(from:)`` requires it, and the agent dials every
/// tunnel on its `tunnelLoop`.
@Suite struct CrossLoopResumeTests {
    /// Where the caller's socket runs, relative to the server's two tunnel connections.
    enum CallerLoop: String, CaseIterable, Sendable {
        /// The suspended tunnel's loop: after the takeover the glue stays there while its stream lives on another.
        case oldTunnel
        /// Neither tunnel's loop (the third loop, which the agent's side and the far ends use too).
        case thirdLoop
        /// The resuming tunnel's loop.
        case newTunnel
    }

    @Test(arguments: CallerLoop.allCases)
    func aSuspendedTunnelTakenOverOnAnotherLoopCarriesItsStreamOnByteExact(callerLoop: CallerLoop) throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 3)
        defer { try? group.syncShutdownGracefully() }
        let agentLoop = group.next()
        let oldLoop = group.next()
        let newLoop = group.next()
        try #require(agentLoop !== oldLoop && oldLoop !== newLoop && newLoop !== agentLoop)
        let glueLoop: EventLoop
        switch callerLoop {
        case .oldTunnel: glueLoop = oldLoop
        case .thirdLoop: glueLoop = agentLoop
        case .newTunnel: glueLoop = newLoop
        }
        let tick = agentLoop  // polls wait on its clock

        // The server's tunnels share the process's budgets, as every connection of a server does.
        let windows = WindowBudget(limit: 64 << 20)
        let kept = RetainedBudget(limit: 64 << 20)
        var serverLimits = TunnelLimits()
        serverLimits.processBudget = windows
        serverLimits.processRetained = kept
        let grace: TimeAmount = .seconds(20)  // longer than any wait below: nothing here may end by the grace period

        // The first connection: the server's side on the old loop, the agent's on its own.
        let (server1, server1Events) = CrossLoop.mux(.server, on: oldLoop, limits: serverLimits, grace: grace)
        let (agent1, agent1Events) = CrossLoop.mux(.agent, on: agentLoop, grace: grace)
        let tunnel1 = try CrossLoop.socketPair(
            acceptedOn: oldLoop, { try $0.addHandlers([FrameDecoder(), FrameEncoder(), server1]) },
            connectingOn: agentLoop, { try $0.addHandlers([FrameDecoder(), FrameEncoder(), agent1]) })

        // A stream: the agent dials its target (a loopback socket whose far end the test holds), the caller's socket
        // is joined to the stream once it opened, as ConnectHandler does.
        let opening = server1.openStream(target: "target.test:80")
        let id = try CrossLoop.waitForValue("the agent to receive the OPEN", tick: tick) { agent1Events.opens.first }
        let targetEnd = LoopbackEnd()
        let target = try CrossLoop.socketPair(
            acceptedOn: agentLoop, { try $0.addHandler(targetEnd) },
            connectingOn: agentLoop, connectingHalfClosure: true,
            { try $0.addHandler(StreamGlue(mux: agent1, streamID: id, eventLoop: agentLoop)) })
        agent1.acceptStream(id)
        guard case .opened(let opened) = try CrossLoop.value(opening, "the stream to open") else {
            Issue.record("the stream did not open")
            return
        }
        #expect(opened == id)
        let callerEnd = LoopbackEnd()
        let caller = try CrossLoop.socketPair(
            acceptedOn: glueLoop, acceptedHalfClosure: true,
            { try $0.addHandler(StreamGlue(mux: server1, streamID: id, eventLoop: glueLoop)) },
            connectingOn: agentLoop, { try $0.addHandler(callerEnd) })

        // What the caller and the target wrote so far, each a running pattern; and waiting for all of it to arrive.
        var up = 0
        var down = 0
        func callerWrites(_ count: Int) {
            caller.connecting.writeAndFlush(pattern(count, from: up), promise: nil)
            up += count
        }
        func targetWrites(_ count: Int) {
            target.accepted.writeAndFlush(pattern(count, from: down), promise: nil)
            down += count
        }
        func everythingArrived(_ when: String) throws {
            let (wantUp, wantDown) = (up, down)
            let what = "\(when): \(wantUp) bytes at the target and \(wantDown) at the caller"
            try CrossLoop.waitUntil(what, tick: tick) { targetEnd.count >= wantUp && callerEnd.count >= wantDown }
        }

        // 1. Both ways over the first connection, past the first window (1 MiB): credit comes back as WINDOWs, from
        //    the caller's glue through its hop to the old loop.
        callerWrites(1_500_000)
        targetWrites(1_200_000)
        try everythingArrived("before the connection is lost")

        // 2. The connection is lost: both sides suspend; the sockets wait, open.
        tunnel1.accepted.close(promise: nil)
        try CrossLoop.waitUntil("both sides of the lost connection to suspend", tick: tick) {
            try CrossLoop.on(oldLoop) { server1.isSuspended } && CrossLoop.on(agentLoop) { agent1.isSuspended }
        }
        #expect(server1Events.suspended == 1 && agent1Events.suspended == 1)
        #expect(caller.accepted.isActive && target.connecting.isActive)  // a pause, not an error

        // 3. Written while suspended: it waits (in the kernel, or as a stream's pending bytes), to go after the resume.
        callerWrites(100_000)
        targetWrites(80_000)

        // 4. The agent comes back on a new connection, whose server side runs on another loop. The agent's new mux
        //    expects the resume (same loop as its old one); the server's takes the old one over from the old loop.
        let (server2, _) = CrossLoop.mux(.server, on: newLoop, limits: serverLimits, grace: grace)
        server2.beginTakeOver()
        let (agent2, _) = CrossLoop.mux(.agent, on: agentLoop, grace: grace)
        #expect(agent2.expectResume(from: agent1))
        let tunnel2 = try CrossLoop.socketPair(
            acceptedOn: newLoop, { try $0.addHandlers([FrameDecoder(), FrameEncoder(), server2]) },
            connectingOn: agentLoop, { try $0.addHandlers([FrameDecoder(), FrameEncoder(), agent2]) })
        let taken = try CrossLoop.value(oldLoop.flatSubmit { server2.takeOver(server1) }, "the takeover")
        #expect(taken == 1)
        try everythingArrived("after the resume")

        // The old muxes handed their stream over and closed; the server's passes socket events on to its successor.
        #expect(
            try CrossLoop.on(oldLoop) {
                server1.successor === server2 && server1.wasTakenOver && server1.streamCount == 0
                    && !server1.isSuspended
            })
        #expect(try CrossLoop.on(agentLoop) { agent1.successor === agent2 && agent1.streamCount == 0 })
        #expect(server1Events.closed == 1 && agent1Events.closed == 1)
        #expect(try CrossLoop.on(newLoop) { server2.streamCount } == 1)

        // 5. A socket read still on its way to the old tunnel (a glue learns of the move only by a hop to its own
        //    loop): the old mux, on its loop, passes it to the new one, on the new loop, and it arrives in order.
        server1.dataFromSocket(id, pattern(10_000, from: up))
        up += 10_000
        try everythingArrived("bytes passed on by the old tunnel")

        // 6. More both ways, straight through the new connection.
        callerWrites(1_500_000)
        targetWrites(1_200_000)
        try everythingArrived("after the takeover")

        // 7. The caller ends its half; the target answers with its end: FIN both ways, and both ends see a clean EOF.
        caller.connecting.close(mode: .output, promise: nil)
        try CrossLoop.waitUntil("both far ends to see the stream end", tick: tick) {
            targetEnd.ended && callerEnd.ended
        }
        #expect(targetEnd.errors.isEmpty && callerEnd.errors.isEmpty)
        #expect(sameBytes(targetEnd.bytes, pattern(up, from: 0)))
        #expect(sameBytes(callerEnd.bytes, pattern(down, from: 0)))
        #expect(tunnel2.accepted.isActive && tunnel2.connecting.isActive)  // nobody broke the protocol
        try CrossLoop.waitUntil("the stream to end on both new muxes", tick: tick) {
            try CrossLoop.on(newLoop) { server2.streamCount == 0 }
                && CrossLoop.on(agentLoop) { agent2.streamCount == 0 }
        }
        // What the stream took from the process on the old loop is given back on the new one, to the byte (what it
        // kept to send again once its confirming PING came back).
        try CrossLoop.waitUntil("the process budgets to be given back", tick: tick) {
            windows.inUse == 0 && kept.inUse == 0
        }

        // Down in order: no hop may land on a loop that has stopped.
        for mux in [server1, server2, agent1, agent2] { mux.closeWithoutResume() }
        let channels = [
            tunnel1.accepted, tunnel1.connecting, tunnel2.accepted, tunnel2.connecting,
            target.accepted, target.connecting, caller.accepted, caller.connecting,
        ]
        for channel in channels { channel.close(promise: nil) }
        for channel in channels { try CrossLoop.value(channel.closeFuture, "a channel to close") }
        for _ in 0..<3 {
            for loop in [agentLoop, oldLoop, newLoop] { try CrossLoop.on(loop) {} }
        }
    }
}

/// Waiting with bounds, and real sockets on chosen loops.
private enum CrossLoop {
    struct TimedOut: Error, CustomStringConvertible {
        let what: String
        var description: String { "timed out waiting for \(what)" }
    }

    /// A resumable mux with a delegate that records what it is told.
    static func mux(
        _ role: TunnelMux.Role, on loop: EventLoop, limits: TunnelLimits = TunnelLimits(), grace: TimeAmount
    ) -> (TunnelMux, MuxEvents) {
        let mux = TunnelMux(role: role, eventLoop: loop, limits: limits)
        let events = MuxEvents()
        mux.delegate = events
        mux.enableResume(grace: grace)
        return (mux, events)
    }

    /// The future's value, or ``TimedOut`` after `timeout`. Not on an event loop.
    static func value<T: Sendable>(
        _ future: EventLoopFuture<T>, _ what: String, within timeout: TimeAmount = .seconds(10)
    ) throws -> T {
        let bounded = future.eventLoop.makePromise(of: T.self)
        let timer = future.eventLoop.scheduleTask(in: timeout) { bounded.fail(TimedOut(what: what)) }
        future.whenComplete { result in
            timer.cancel()
            bounded.completeWith(result)  // ignored if the timer came first
        }
        return try bounded.futureResult.wait()
    }

    /// Runs `body` on `loop` (where a mux's state may be read) and returns its result.
    @discardableResult
    static func on<T: Sendable>(_ loop: EventLoop, _ body: @escaping @Sendable () throws -> T) throws -> T {
        try value(loop.submit(body), "a task on \(loop)")
    }

    /// Polls `probe` every 2 ms until it gives a value; ``TimedOut`` after `timeout`.
    static func waitForValue<T>(
        _ what: String, tick loop: EventLoop, within timeout: TimeAmount = .seconds(10), _ probe: () throws -> T?
    ) throws -> T {
        let deadline = NIODeadline.now() + timeout
        while true {
            if let found = try probe() { return found }
            guard NIODeadline.now() < deadline else { throw TimedOut(what: what) }
            try loop.scheduleTask(in: .milliseconds(2)) {}.futureResult.wait()
        }
    }

    static func waitUntil(
        _ what: String, tick loop: EventLoop, within timeout: TimeAmount = .seconds(10), _ condition: () throws -> Bool
    ) throws {
        _ = try waitForValue(what, tick: loop, within: timeout) { try condition() ? true : nil }
    }

    /// A TCP connection on 127.0.0.1 whose accepted end runs on `acceptedOn` and whose connecting end on
    /// `connectingOn`, each with the handlers its closure adds before it is active. Returns once both ends are active.
    static func socketPair(
        acceptedOn: EventLoop, acceptedHalfClosure: Bool = false,
        _ acceptedHandlers: @escaping @Sendable (ChannelPipeline.SynchronousOperations) throws -> Void,
        connectingOn: EventLoop, connectingHalfClosure: Bool = false,
        _ connectingHandlers: @escaping @Sendable (ChannelPipeline.SynchronousOperations) throws -> Void
    ) throws -> (accepted: Channel, connecting: Channel) {
        let active = acceptedOn.makePromise(of: Channel.self)
        defer { active.fail(ChannelError.ioOnClosedChannel) }  // ignored once it succeeded; no promise may leak
        let listener = try ServerBootstrap(group: acceptedOn)
            .childChannelOption(.allowRemoteHalfClosure, value: acceptedHalfClosure)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(ActiveSignal(active))
                    try acceptedHandlers(sync)
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
        defer { listener.close(promise: nil) }
        let connecting = try ClientBootstrap(group: connectingOn)
            .channelOption(.allowRemoteHalfClosure, value: connectingHalfClosure)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try connectingHandlers(channel.pipeline.syncOperations) }
            }
            .connect(to: listener.localAddress!).wait()
        return (try value(active.futureResult, "the accepted socket to be active"), connecting)
    }
}

/// Records what a mux tells its owner, readable from the test's thread.
private final class MuxEvents: TunnelMuxDelegate, @unchecked Sendable {
    private let state = NIOLockedValueBox((opens: [UInt32](), suspended: 0, closed: 0))
    var opens: [UInt32] { state.withLockedValue { $0.opens } }
    var suspended: Int { state.withLockedValue { $0.suspended } }
    var closed: Int { state.withLockedValue { $0.closed } }

    func mux(_ mux: TunnelMux, didReceiveOpen open: Open, streamID: UInt32) {
        state.withLockedValue { $0.opens.append(streamID) }
    }
    func mux(_ mux: TunnelMux, didReceiveControl frame: Frame) {}
    func muxDidSuspend(_ mux: TunnelMux) { state.withLockedValue { $0.suspended += 1 } }
    func muxDidClose(_ mux: TunnelMux) { state.withLockedValue { $0.closed += 1 } }
}

/// The far end of a socket (a caller, a target): keeps what it reads, and whether its input ended and how.
private final class LoopbackEnd: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    private let state = NIOLockedValueBox((bytes: [UInt8](), ended: false, errors: [String]()))
    var bytes: [UInt8] { state.withLockedValue { $0.bytes } }
    var count: Int { state.withLockedValue { $0.bytes.count } }
    /// The socket closed (its peer's EOF closes it: no half-closure on this end).
    var ended: Bool { state.withLockedValue { $0.ended } }
    /// A reset or any other failure: the stream did not end cleanly.
    var errors: [String] { state.withLockedValue { $0.errors } }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        state.withLockedValue { $0.bytes.append(contentsOf: buffer.readableBytesView) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        state.withLockedValue { $0.ended = true }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        state.withLockedValue { $0.errors.append("\(error)") }
        context.close(promise: nil)
    }
}

/// Completes its promise with the channel once the channel is active, or fails it if the channel goes first.
private final class ActiveSignal: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private let promise: EventLoopPromise<Channel>

    init(_ promise: EventLoopPromise<Channel>) {
        self.promise = promise
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        promise.succeed(context.channel)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        promise.fail(ChannelError.ioOnClosedChannel)
    }
}
