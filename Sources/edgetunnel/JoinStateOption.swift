import ArgumentParser
import KubeAPI
import Logging
import NIOPosix
import TunnelPKI
import TunnelSupport

/// Where `edgetunnel token` and `edgetunnel node` find the join state: the PKI folder, or (as the server's
/// `--join-state-namespace`) ConfigMaps in a namespace, through a kubeconfig or the pod's service account
/// (`kubectl exec deploy/edge-tunnel-server -- edgetunnel node reset NAME --join-state-namespace NS`).
struct JoinStateOption: ParsableArguments {
    @Option(name: .customLong("pki-dir"), help: "The PKI folder.")
    var directory: String = PKIPaths.defaultServerDirectory

    @Option(
        name: .customLong("join-state-namespace"),
        help: "The namespace whose ConfigMaps hold the join state, instead of the PKI folder.")
    var namespace: String?

    @Option(help: "A kubeconfig for --join-state-namespace (default: the pod's service account).")
    var kubeconfig: String?

    func store() throws -> any JoinStateStore {
        guard let namespace else { return FileJoinState(paths: PKIPaths(directory: directory)) }
        guard DNSName.isValid(namespace), !namespace.contains(".") else {
            throw ConfigurationError("invalid --join-state-namespace \"\(namespace)\": must be a namespace name")
        }
        let config = try kubeconfig.map { try KubeConfig.kubeconfig(path: $0) } ?? KubeConfig.inCluster()
        let client = try KubeClient(config: config, group: MultiThreadedEventLoopGroup.singleton)
        return KubeJoinState(client: client, namespace: namespace, logger: Logger(label: "edgetunnel"))
    }
}
