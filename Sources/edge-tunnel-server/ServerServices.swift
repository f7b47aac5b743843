import KubeAPI
import Logging
import NIOPosix
import ServiceLifecycle
import TunnelServer
import UnixSignals

/// The server's long-running parts as swift-service-lifecycle services, run by one `ServiceGroup` that turns
/// SIGTERM and SIGINT into a graceful shutdown (last service first: the reload triggers, then the server).

/// Re-reads the config file when it changes, and on SIGHUP.
struct ConfigReloadService: Service {
    let reloader: ConfigReloader?
    let logger: Logger

    func run() async throws {
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        let reloader = reloader
        let logger = logger
        await cancelWhenGracefulShutdown {
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
        let client = try KubeClient.forServer(server)
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
        await cancelWhenGracefulShutdown { await leases.run() }
    }
}

/// The Service's addresses, followed live into the serving certificate's SANs (with the configured ones).
struct ServiceAddressService: Service {
    let addresses: ServiceAddresses
    let service: String
    let server: TunnelServer
    let logger: Logger

    init(configuration: ServerConfiguration, service: String, server: TunnelServer, logger: Logger) throws {
        self.service = service
        let parts = service.split(separator: "/")
        addresses = ServiceAddresses(
            client: try KubeClient.forServer(server), namespace: String(parts[0]), name: String(parts[1]),
            logger: logger)
        self.server = server
        self.logger = logger
    }

    func run() async throws {
        let (addresses, service, server, logger) = (addresses, service, server, logger)
        await cancelWhenGracefulShutdown {
            await addresses.run { ips, names in
                do {
                    let taken = try server.setServiceAddresses(service, ips: ips, dnsNames: names)
                    logger.info(
                        "the addresses of Service \(service): \((taken.ips + taken.dnsNames).joined(separator: ", "))")
                } catch {
                    logger.error("the addresses of Service \(service) cannot go into the certificate: \(error)")
                }
            }
        }
    }
}

/// The cluster's Node objects: the server checks registrations against them, stops routing an address to a node
/// whose Node no longer reports it, and closes deleted Nodes' tunnels.
struct NodeObjectsService: Service {
    let directory: NodeDirectory
    let server: TunnelServer

    init(configuration: ServerConfiguration, server: TunnelServer, logger: Logger) throws {
        directory = NodeDirectory(
            client: try KubeClient.forServer(server), logger: logger, poolLabel: configuration.poolLabel)
        self.server = server
        server.useNodeObjects(directory)
    }

    func run() async throws {
        let (directory, server) = (directory, server)
        await cancelWhenGracefulShutdown {
            await directory.run(
                onDeleted: { name in server.nodeDeleted(name) },
                onAddressesChanged: { names in server.nodeAddressesChanged(names) })
        }
    }
}

/// Bootstrap tokens and node records as ConfigMaps every replica watches: a join through one replica, and an
/// operator's reset or revocation, reach all of them.
struct JoinStateService: Service {
    let state: KubeJoinState
    let server: TunnelServer

    init(configuration: ServerConfiguration, namespace: String, server: TunnelServer, logger: Logger) throws {
        state = KubeJoinState(client: try KubeClient.forServer(server), namespace: namespace, logger: logger)
        self.server = server
        server.useJoinState(state)
    }

    func run() async throws {
        let (state, server) = (state, server)
        await cancelWhenGracefulShutdown {
            await state.follow { server.joinStateChanged() }
        }
    }
}

extension KubeClient {
    /// The Kubernetes API as the server's configuration says (its kubeconfig, or the pod's service account), on
    /// the server's own event loops: no second thread pool beside the one `--event-loop-threads` sized.
    static func forServer(_ server: TunnelServer) throws -> KubeClient {
        let kube =
            try server.configuration.kubeconfig.map { try KubeConfig.kubeconfig(path: $0) } ?? KubeConfig.inCluster()
        return try KubeClient(config: kube, group: server.group)
    }
}
