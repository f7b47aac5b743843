import Logging
import NIOCore
import Testing
import TunnelWire

@testable import TunnelAgent

/// One tunnel connection's life (``AgentTunnel/Life``), driven transition by transition without a connection, and
/// the failover loop's stop by cancellation.
@Suite struct AgentTunnelLifeTests {
    func withTunnel(_ body: (AgentTunnel) async throws -> Void) async throws {
        let configuration = AgentConfiguration(nodeName: "edge-1", serverAddresses: ["127.0.0.1:1"])
        let agent = try EdgeTunnelAgent(configuration: configuration, logger: .init(label: "test"))
        let tunnel = AgentTunnel(
            agent: agent, address: try ServerAddress(parsing: "127.0.0.1:1"), eventLoop: agent.tunnelLoop)
        try await body(tunnel)
        tunnel.abandon(CancellationError())
        await agent.stop()
        await agent.shutdown()
    }

    @Test func helloOKRegistersOnceAndASecondIsRefused() async throws {
        try await withTunnel { tunnel in
            #expect(tunnel.state == .connecting && !tunnel.registered && tunnel.serverID == nil)
            #expect(tunnel.register(serverID: "replica-a"))
            #expect(tunnel.state == .registered(serverID: "replica-a") && tunnel.registered)
            // A second HELLO_OK, naming another replica, must not rename the tunnel (it could then claim that
            // replica's suspended streams).
            #expect(!tunnel.register(serverID: "replica-b"))
            #expect(tunnel.serverID == "replica-a")
        }
    }

    @Test func unusableKeepsTheNameAndDeadSticks() async throws {
        try await withTunnel { tunnel in
            _ = tunnel.register(serverID: "replica-a")
            tunnel.markUnusable(dead: true)
            #expect(tunnel.state == .unusable(serverID: "replica-a", dead: true))
            #expect(tunnel.isUnusable && tunnel.declaredDead && tunnel.registered)
            tunnel.markUnusable()  // a later close does not make a dead tunnel merely closed
            #expect(tunnel.declaredDead)
            #expect(!tunnel.register(serverID: "replica-b"))
            #expect(await tunnel.waitUnusable(timeout: .seconds(5)))
        }
    }

    @Test func aTunnelUnusableBeforeItsHelloOKIsNamedByItButStaysUnusable() async throws {
        try await withTunnel { tunnel in
            tunnel.markUnusable()
            #expect(tunnel.state == .unusable(serverID: nil, dead: false) && !tunnel.registered)
            #expect(tunnel.register(serverID: "replica-a"))
            #expect(tunnel.state == .unusable(serverID: "replica-a", dead: false))
        }
    }

    @Test func aWaitOnAUsableTunnelEndsWhenItsTaskIsCancelled() async throws {
        try await withTunnel { tunnel in
            let waiting = Task { await tunnel.waitUnusable(timeout: .seconds(600)) }
            try await Task.sleep(for: .milliseconds(50))
            waiting.cancel()
            #expect(await waiting.value)  // at once, not after 600 s
            #expect(!tunnel.isUnusable)
        }
    }

    /// The failover loop backs off between dials to an address where nothing listens; stop() cancels it, so run()
    /// returns without waiting for the backoff (30 s here).
    @Test func stopEndsTheFailoverLoopInItsBackoff() async throws {
        var configuration = AgentConfiguration(nodeName: "edge-1", serverAddresses: ["127.0.0.1:1"])
        configuration.backoffInitial = .seconds(30)
        configuration.backoffCap = .seconds(30)
        let agent = try EdgeTunnelAgent(configuration: configuration, logger: .init(label: "test"))
        let clock = ContinuousClock()
        let started = clock.now
        let running = Task { await agent.run() }
        try await Task.sleep(for: .milliseconds(300))
        await agent.stop()
        await running.value
        #expect(clock.now - started < .seconds(25))
        #expect(!(await agent.waitUntilConnected(within: .seconds(1))))  // a stopped agent answers false at once
        await agent.shutdown()
    }
}
