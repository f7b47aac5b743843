import KubeAPI
import Logging
import NIOPosix
import ServiceLifecycle
import TunnelServer
import UnixSignals

/// The server's long-running parts as swift-service-lifecycle services, run by one `ServiceGroup` that turns
/// SIGTERM and SIGINT into a graceful shutdown (last service first: the reload triggers, then the server).

/// The listeners and tunnels (started before the group, so that a port in use fails the process at once). On
/// graceful shutdown: no new connections, GOAWAY to every agent, open streams drained for up to 10 s.
struct TunnelServerService: Service {
    let server: TunnelServer
    let logger: Logger

    func run() async throws {
        try? await gracefulShutdown()  // also returns when the group is cancelled: drain either way
        logger.info("shutting down: draining")
        await server.shutdown()
    }
}

/// Re-reads the config file when it changes, and on SIGHUP.
struct ConfigReloadService: Service {
    let reloader: ConfigReloader?
    let logger: Logger

    func run() async throws {
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        let reloader = reloader
        let logger = logger
        try await cancelWhenGracefulShutdown {
            await withTaskGroup(of: Void.self) { group in
                if let reloader { group.addTask { await reloader.watch() } }
                group.addTask {
                    for await _ in hangups {
                        if let reloader {
                            reloader.reload(reason: "SIGHUP")
                        } else {
                            logger.info("SIGHUP: no --config file to reload")
                        }
                    }
                }
            }
        }
    }
}

/// This replica's Lease, renewed, and the count of all current ones given to the server (which tells every
/// agent). On graceful shutdown the Lease is deleted, so the other replicas count one fewer at once.
struct ReplicaLeaseService: Service {
    let leases: ReplicaLeases

    init(configuration: ServerConfiguration, namespace: String, server: TunnelServer, logger: Logger) throws {
        let kube = try configuration.kubeconfig.map { try KubeConfig.kubeconfig(path: $0) } ?? KubeConfig.inCluster()
        let client = try KubeClient(config: kube, group: MultiThreadedEventLoopGroup.singleton)
        let parts = configuration.leaseLabel.split(separator: "=")
        leases = ReplicaLeases(
            client: client, namespace: namespace, serverID: configuration.serverID,
            label: (String(parts[0]), String(parts[1])), logger: logger
        ) { count in
            server.setServerCount(count)
        }
    }

    func run() async throws {
        let leases = leases
        try await cancelWhenGracefulShutdown { await leases.run() }
    }
}
