import Logging
import NIOConcurrencyHelpers
import ServiceLifecycle

/// The agent as a swift-service-lifecycle service: the edge-tunnel-agent binary, `edgetunnel demo` and tests start
/// and stop it the same way. ``start()`` gets the node's credentials (joining with the bootstrap token if it has
/// none) and opens the meta port (a binary calls it before its service group runs, so that a refused join fails
/// the process at once); ``run()`` starts it if that was not done, keeps the tunnels up (failover, one per server
/// replica) until graceful shutdown or cancellation, then drains: the server is told to send no new streams, open
/// ones finish for up to 10 s.
public final class AgentService: Service, Sendable {
    /// Where the agent is in its life. Moves forward only.
    public enum State: Sendable, Equatable {
        case created
        case running
        case draining
        case stopped
    }

    public let agent: EdgeTunnelAgent
    private let logger: Logger
    private let life = NIOLockedValueBox(State.created)

    public init(agent: EdgeTunnelAgent, logger: Logger) {
        self.agent = agent
        self.logger = logger
    }

    public var state: State { life.withLockedValue { $0 } }

    /// Credentials and the meta port; once only (a second call does nothing).
    public func start() async throws {
        guard life.withLockedValue({ $0 == .created }) else { return }
        try await agent.prepareCredentials()
        try await agent.startMeta()
        life.withLockedValue { $0 = .running }
    }

    public func run() async throws {
        try await start()
        let agent = agent
        async let tunnels: Void = agent.run()
        try? await gracefulShutdown()  // also returns when the group is cancelled: drain either way
        life.withLockedValue { $0 = .draining }
        logger.info("shutting down: draining")
        await agent.stop()
        await tunnels
        await agent.shutdown()
        life.withLockedValue { $0 = .stopped }
    }
}
