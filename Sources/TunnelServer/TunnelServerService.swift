import Logging
import ServiceLifecycle
import TunnelSupport

/// The server as a swift-service-lifecycle service: the edge-tunnel-server binary, `edgetunnel demo` and tests
/// start and stop it the same way. ``start()`` binds the listeners (a binary calls it before its service group
/// runs, so that a port in use fails the process at once); ``run()`` starts it if that was not done, serves until
/// graceful shutdown (or cancellation), then drains: no new connections, GOAWAY to every agent, open streams
/// finish for up to 10 s.
public final class TunnelServerService: Service, Sendable {
    public let server: TunnelServer
    private let logger: Logger
    private let life = ServiceLife()

    public init(server: TunnelServer, logger: Logger) {
        self.server = server
        self.logger = logger
    }

    public var state: ServiceState { life.state }

    /// Binds the listeners; once only (a second call does nothing).
    public func start() async throws {
        try await life.start { try await server.start() }
    }

    public func run() async throws {
        try await start()
        try? await gracefulShutdown()  // also returns when the group is cancelled: drain either way
        logger.info("shutting down: draining")
        await life.drain { await server.shutdown() }
    }
}
