import Foundation
import Logging
import ServiceLifecycle
import TunnelAgent

/// The agent's long-running parts besides the agent itself (``AgentService``, in TunnelAgent), run by one
/// `ServiceGroup` that turns SIGTERM and SIGINT into a graceful shutdown (last service first: the addresses
/// watcher, then the tunnels).

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
