import FuzzSupport
import NIOCore
import NIOEmbedded
import TunnelWire

/// libFuzzer target: arbitrary bytes as a tunnel connection's input, through the frame decoder into a mux, as
/// the server (first byte even) or as the agent (odd). With the first byte's second bit set, the connection is a
/// resume: its mux takes over three streams of a suspended tunnel (the server's waits for the agent's RESUME, the
/// agent's for the server's), so the input's RESUME offsets, windows and FIN claims are checked against real
/// retained bytes. The second byte chooses the split of the input into reads. Whatever arrives, the process must not trap; errors close the connection, as they should.
final class Delegate: TunnelMuxDelegate {
    var accept = true
    func mux(_ mux: TunnelMux, didReceiveOpen open: Open, streamID: UInt32) {
        accept.toggle()
        if accept { mux.acceptStream(streamID) } else { mux.rejectStream(streamID, code: 403, reason: open.target) }
    }
    /// Every control payload goes through the decoder its receiver uses (AgentSession, AgentTunnel, the join),
    /// and the peer's strings come back in a REFUSED, bounded as the refusals bound them: no payload may trap or
    /// make us build an illegal frame (issue 13's first outage was such an echo).
    func mux(_ mux: TunnelMux, didReceiveControl frame: Frame) {
        switch frame.type {
        case .hello:
            if let hello = try? Hello(frame: frame) {
                let ips = hello.nodeIPs.prefix(4).map { PeerText.bounded($0) }.joined(separator: ", ")
                mux.sendControl(Refused(reason: "node \(PeerText.bounded(hello.nodeName)) with IPs \(ips)"))
            }
            mux.peerRegistered()
        case .helloOK:
            _ = try? HelloOK(frame: frame)
            mux.peerRegistered()
        case .refused:
            if let refused = try? Refused(frame: frame) { _ = PeerText.bounded(refused.reason) }
        case .goaway:
            if let goaway = try? GoAway(frame: frame) { _ = PeerText.bounded(goaway.reason) }
        case .join:
            if let join = try? JoinRequest(frame: frame) {
                mux.sendControl(Refused(reason: "join for \(PeerText.bounded(join.nodeName)) refused"))
            }
        case .joinOK:
            _ = try? JoinOK(frame: frame)
        case .renew:
            _ = try? RenewRequest(frame: frame)
        case .renewOK:
            _ = try? RenewOK(frame: frame)
        case .serverCount:
            _ = try? ServerCount(frame: frame)
        default:
            break
        }
    }
    func muxDidClose(_ mux: TunnelMux) {}
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzWire(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeBufferPointer(start: data, count: size)
    guard input.count >= 2 else { return 0 }
    let role: TunnelMux.Role = input[0] % 2 == 0 ? .server : .agent
    let chunk = Int(input[1]) + 1
    let loop = EmbeddedEventLoop()
    let channel = EmbeddedChannel(loop: loop)
    var limits = TunnelLimits()
    limits.maxUnreadReplies = 16
    limits.maxStreams = 8
    limits.processBudget = WindowBudget(limit: 4 << 20)
    let mux = TunnelMux(role: role, eventLoop: channel.eventLoop, limits: limits)
    mux.delegate = Delegate()
    do {
        try channel.pipeline.syncOperations.addHandlers([
            FrameDecoder(maxPayload: Frame.maxUnregisteredPayload), FrameEncoder(), mux,
        ])
        try channel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
    } catch {
        return 0
    }
    if input[0] & 2 != 0 {
        guard let old = suspendedTunnel(role: role, limits: limits, loop: loop) else { return 0 }
        mux.enableResume(grace: .seconds(30))
        if role == .server {
            _ = mux.takeOver(old)
        } else {
            mux.expectResume(from: old)
        }
    } else if role == .server {
        for _ in 0..<3 { _ = mux.openStream(target: "edge-1:10250") }
    }
    var offset = 2
    while offset < input.count {
        let end = min(input.count, offset + chunk)
        var buffer = channel.allocator.buffer(capacity: end - offset)
        buffer.writeBytes(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(input)[offset..<end]))
        _ = try? channel.writeInbound(buffer)
        channel.embeddedEventLoop.run()
        while (try? channel.readOutbound(as: ByteBuffer.self)) != nil {}
        offset = end
    }
    _ = try? channel.finish()
    return 0
}

/// A resumable tunnel with three open streams (1, 3, 5), 100, 300 and 0 bytes sent on each, suspended after its
/// connection closed, on the fuzzed connection's loop.
func suspendedTunnel(role: TunnelMux.Role, limits: TunnelLimits, loop: EmbeddedEventLoop) -> TunnelMux? {
    let channel = EmbeddedChannel(loop: loop)
    let mux = TunnelMux(role: role, eventLoop: channel.eventLoop, limits: limits)
    mux.enableResume(grace: .seconds(30))
    guard (try? channel.pipeline.syncOperations.addHandler(mux)) != nil,
        (try? channel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()) != nil
    else { return nil }
    for (index, id) in [UInt32(1), 3, 5].enumerated() {
        if role == .server {
            _ = mux.openStream(target: "edge-1:10250")
            _ = try? channel.writeInbound(OpenOK(window: 1000).frame(streamID: id))
        } else {
            _ = try? channel.writeInbound(Open(target: "127.0.0.1:10250", window: 1000).frame(streamID: id))
            mux.acceptStream(id)
        }
        let socket = EmbeddedChannel(loop: loop)
        guard
            (try? socket.pipeline.syncOperations.addHandler(StreamGlue(mux: mux, streamID: id, eventLoop: loop)))
                != nil,
            (try? socket.connect(to: .init(ipAddress: "127.0.0.1", port: 2)).wait()) != nil
        else { return nil }
        loop.run()
        _ = try? socket.writeInbound(ByteBuffer(repeating: 7, count: [100, 300, 0][index]))
    }
    channel.embeddedEventLoop.run()
    _ = try? channel.close().wait()
    return mux.isSuspended ? mux : nil
}

runFuzzer { data, size in
    guard let data else { return 0 }
    return fuzzWire(data, size)
}
