import Foundation
import Logging
import ServiceLifecycle
import TunnelAgent

/// The agent's long-running parts as swift-service-lifecycle services, run by one `ServiceGroup` that turns
/// SIGTERM and SIGINT into a graceful shutdown (last service first: the addresses watcher, then the tunnels).

/// The tunnels: kept up (failover, one per server replica) until graceful shutdown, then drained — the server
/// is told to send no new streams, open ones finish for up to 10 s.
struct AgentService: Service {
    let agent: EdgeTunnelAgent
    let logger: Logger

    func run() async throws {
        let agent = agent
        async let tunnels: Void = agent.run()
        try? await gracefulShutdown()  // also returns when the group is cancelled: drain either way
        logger.info("shutting down: draining")
        await agent.stop()
        await tunnels
        await agent.shutdown()
    }
}

/// Re-reads the addresses file every 2 s (a ConfigMap update swaps a symlink; polling catches it).
struct AddressesFileService: Service {
    let path: String
    let agent: EdgeTunnelAgent
    let logger: Logger

    func run() async throws {
        let (path, agent, logger) = (path, agent, logger)
        await cancelWhenGracefulShutdown {
            var last = (try? readAddresses(path)) ?? []
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(2))
                do {
                    let current = try readAddresses(path)
                    guard current != last else { continue }
                    try agent.setServerAddresses(entries: current)
                    last = current
                } catch {
                    logger.error("\(path): keeping the current server addresses: \(error)")
                    if let current = try? readAddresses(path) { last = current }
                }
            }
        }
    }
}
