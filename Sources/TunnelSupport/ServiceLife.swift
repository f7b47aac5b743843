import NIOConcurrencyHelpers

/// Where a long-running part (the server, the agent) is in its life as a service. It moves forward only.
public enum ServiceState: Sendable, Equatable {
    case created
    /// ``ServiceLife/start(_:)`` is under way.
    case starting
    case running
    case draining
    case stopped
}

/// The life of a service (``ServiceState``) and its transitions, shared by `TunnelServerService` and
/// `AgentService`: start runs once, whoever calls it first; drain runs once, after the service has run.
public final class ServiceLife: Sendable {
    private let box = NIOLockedValueBox(ServiceState.created)

    public init() {}

    public var state: ServiceState { box.withLockedValue { $0 } }

    /// Runs `body` and moves to `running`, unless the service was started before (then it returns at once). A
    /// failed start leaves the service `stopped`.
    public func start(_ body: () async throws -> Void) async throws {
        let first = box.withLockedValue { state -> Bool in
            guard state == .created else { return false }
            state = .starting
            return true
        }
        guard first else { return }
        do {
            try await body()
        } catch {
            box.withLockedValue { $0 = .stopped }
            throw error
        }
        box.withLockedValue { $0 = .running }
    }

    /// Moves to `draining`, runs `body`, then `stopped`.
    public func drain(_ body: () async -> Void) async {
        box.withLockedValue { $0 = .draining }
        await body()
        box.withLockedValue { $0 = .stopped }
    }
}
