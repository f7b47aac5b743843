import ServiceLifecycle
import UnixSignals

/// SIGTERM and SIGINT trapped from before a process's listeners are up until its `ServiceGroup` runs.
///
/// A `ServiceGroup` installs its signal handlers when it runs, and the server and the agent start listening
/// (and answer `/readyz`) before that, so that a bad port fails the start with a one-line error. A SIGTERM in between
/// took the default action: the process died at once, without its drain (a pod stopped right after it became
/// ready; a test saw it on one core). Trapped here first, such a signal becomes the group's graceful shutdown,
/// which it remembers if it does not run yet.
public struct EarlySignals: Sendable {
    private let signals: UnixSignalsSequence

    /// Traps the signals now.
    public static func trap() async -> EarlySignals {
        EarlySignals(signals: await UnixSignalsSequence(trapping: .sigterm, .sigint))
    }

    /// Runs `group`, turning a signal that came before it (or any later) into its graceful shutdown.
    public func run(_ group: ServiceGroup) async throws {
        let relay = Task {
            for await _ in signals {
                await group.triggerGracefulShutdown()
            }
        }
        defer { relay.cancel() }
        try await group.run()
    }
}
