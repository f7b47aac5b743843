import Yams

/// The server's Services: the agents' tunnel Service (its type by the connectivity mode), the callers' Service of
/// ready replicas only, and the headless Service that names every replica.
extension Manifests {
    static func serviceObjects(
        _ o: ManifestOptions, labels serverLabels: Node
    ) -> (
        tunnel: Node, callers: Node, headless: Node
    ) {
        let ns = o.namespace
        let service = object(
            "v1", "Service", "x-tunnel-server-svc", ns, labels: map([("name", s("edge-tunnel-server"))]),
            extra: [
                (
                    "spec",
                    map([
                        ("type", s(o.serviceMode == .internet ? "LoadBalancer" : "ClusterIP")),
                        ("selector", serverLabels),
                        (
                            "ports",
                            seq([
                                servicePort("https", 10263),
                                servicePort("tcp", 10262),
                            ])
                        ),
                        ("sessionAffinity", s("None")),
                        // Agents must reach a replica before it is ready: it becomes ready once they hold tunnels to it.
                        ("publishNotReadyAddresses", b(true)),
                    ])
                )
            ])
        // The callers' Service: only ready replicas, i.e. those that hold a tunnel from every joined node, so a
        // rolling update or a restarted replica never answers a caller 502 for a node that has not attached yet.
        let callers = object(
            "v1", "Service", "x-tunnel-server-internal-svc", ns, labels: serverLabels,
            extra: [
                (
                    "spec",
                    map([
                        ("type", s("ClusterIP")),
                        ("selector", serverLabels),
                        (
                            "ports",
                            seq([
                                servicePort("https", 10263)
                            ])
                        ),
                    ])
                )
            ])
        let headless = object(
            "v1", "Service", "x-tunnel-server-headless", ns, labels: serverLabels,
            extra: [
                (
                    "spec",
                    map([
                        ("clusterIP", s("None")),
                        ("selector", serverLabels),
                        (
                            "ports",
                            seq([
                                servicePort("tcp", 10262),
                                servicePort("https", 10263),
                            ])
                        ),
                    ])
                )
            ])
        return (service, callers, headless)
    }

    /// A TCP port of a Service, forwarded to the same port of the pods.
    static func servicePort(_ name: String, _ port: Int) -> Node {
        map([("name", s(name)), ("port", n(port)), ("protocol", s("TCP")), ("targetPort", n(port))])
    }
}
