import Logging
import NIOConcurrencyHelpers
import ServiceLifecycle

/// The server as a swift-service-lifecycle service: the edge-tunnel-server binary, `edgetunnel demo` and tests
/// start and stop it the same way. ``start()`` binds the listeners (a binary calls it before its service group
/// runs, so that a port in use fails the process at once); ``run()`` starts it if that was not done, serves until
/// graceful shutdown (or cancellation), then drains: no new connections, GOAWAY to every agent, open streams
/// finish for up to 10 s.
public final class TunnelServerService: Service, Sendable {
    /// Where the server is in its life. Moves forward only.
    public enum State: Sendable, Equatable {
        case created
        case running
        case draining
        case stopped
    }

    public let server: TunnelServer
    private let logger: Logger
    private let life = NIOLockedValueBox(State.created)

    public init(server: TunnelServer, logger: Logger) {
        self.server = server
        self.logger = logger
    }

    public var state: State { life.withLockedValue { $0 } }

    /// Binds the listeners; once only (a second call does nothing).
    public func start() async throws {
        guard life.withLockedValue({ $0 == .created }) else { return }
        try await server.start()
        life.withLockedValue { $0 = .running }
    }

    public func run() async throws {
        try await start()
        try? await gracefulShutdown()  // also returns when the group is cancelled: drain either way
        life.withLockedValue { $0 = .draining }
        logger.info("shutting down: draining")
        await server.shutdown()
        life.withLockedValue { $0 = .stopped }
    }
}
