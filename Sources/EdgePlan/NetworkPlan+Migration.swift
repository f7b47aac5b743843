/// How a cluster moves its tunnel onto a private line, by Kubernetes version (the source document's rule): below
/// 1.20.11 the tunnel is reconfigured, from 1.22 on through a dedicated edge node pool, and in between the
/// cluster is upgraded first.
extension NetworkPlan {
    static func migration(version: KubernetesVersion, privateLine: Bool, linePools: [EdgePool]?) -> MigrationDecision {
        guard privateLine else {
            return MigrationDecision(
                path: .notApplicable, reason: "over the internet the tunnel stays on its public load balancer",
                steps: [])
        }
        if version < reconfigurableBelow {
            return MigrationDecision(
                path: .reconfigureTunnel,
                reason:
                    "Kubernetes \(version) is older than 1.20.11: the tunnel's configuration can be changed in place",
                steps: [
                    "set the tunnel Service x-tunnel-server-svc to type ClusterIP",
                    "add the Service's ClusterIP (the private-line address) to the server's certIPs in its config file; "
                        + "EdgeTunnel issues its certificate for the new address set itself: nothing under "
                        + "/var/lib/edge-tunnel-server/pki needs deleting",
                    linePools == nil
                        ? "put the private-line address first in the agents' server addresses (the edge-tunnel-config "
                            + "ConfigMap), the public one after it: agents use the first address that works"
                        : "render the manifests with the same pools (edgetunnel manifests --pool ... or --file): each "
                            + "pool's edge-tunnel-pool-NAME ConfigMap names the private-line address first, and agents use "
                            + "the first address that works",
                ])
        }
        if version >= nodePoolFrom {
            guard let linePools, !linePools.isEmpty else {
                return MigrationDecision(
                    path: .dedicatedNodePool,
                    reason: "Kubernetes \(version) is 1.22 or later: edge node pools can connect over the private line",
                    steps: [
                        "create a dedicated edge node pool whose nodes connect to the cloud over the private line",
                        "move the edge nodes that sit behind the line into that pool",
                    ])
            }
            let one = linePools.count == 1
            return MigrationDecision(
                path: .dedicatedNodePool,
                reason: "Kubernetes \(version) is 1.22 or later: edge node pools can connect over the private line, "
                    + "as \(names(linePools)) \(one ? "does" : "do")",
                steps: [
                    "create \(names(linePools)) as \(one ? "a dedicated edge node pool" : "dedicated edge node pools") and put "
                        + "the nodes behind the line in \(one ? "it" : "them") (node selector "
                        + linePools.map(\.selectorText).joined(separator: "; ") + ")",
                    "render the manifests with the same pools (edgetunnel manifests --pool ... or --file): one agent DaemonSet "
                        + "and one ConfigMap of server addresses per pool, and the commands that create each pool's bootstrap token",
                ])
        }
        return MigrationDecision(
            path: .upgrade,
            reason:
                "Kubernetes \(version) is between 1.20.11 and 1.22: neither reconfiguring the tunnel nor a private-line node pool is documented for it; upgrade the cluster to 1.22 or later",
            steps: [
                "upgrade the cluster to Kubernetes 1.22 or later",
                "then create a dedicated edge node pool over the private line",
            ])
    }
}
