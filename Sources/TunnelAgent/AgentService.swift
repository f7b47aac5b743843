import Logging
import ServiceLifecycle
import TunnelSupport

/// The agent as a swift-service-lifecycle service: the edge-tunnel-agent binary, `edgetunnel demo` and tests start
/// and stop it the same way. ``start()`` gets the node's credentials (joining with the bootstrap token if it has
/// none) and opens the meta port (a binary calls it before its service group runs, so that a refused join fails
/// the process at once); ``run()`` starts it if that was not done, keeps the tunnels up (failover, one per server
/// replica) until graceful shutdown or cancellation, then drains: the server is told to send no new streams, open
/// ones finish for up to 10 s.
public final class AgentService: Service, Sendable {
    public let agent: EdgeTunnelAgent
    private let logger: Logger
    private let life = ServiceLife()

    public init(agent: EdgeTunnelAgent, logger: Logger) {
        self.agent = agent
        self.logger = logger
    }

    public var state: ServiceState { life.state }

    /// Credentials and the meta port; once only (a second call does nothing).
    public func start() async throws {
        try await life.start {
            try await agent.prepareCredentials()
            try await agent.startMeta()
        }
    }

    public func run() async throws {
        try await start()
        let agent = agent
        let tunnels = Task { await agent.run() }
        try? await gracefulShutdown()  // also returns when the group is cancelled: drain either way
        logger.info("shutting down: draining")
        await life.drain {
            await agent.stop()
            await tunnels.value
            await agent.shutdown()
        }
    }
}
