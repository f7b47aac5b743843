import Yams

/// The server's RBAC: exactly what its Kubernetes client uses (each replica's Lease, the Services whose addresses
/// its certificate names, the Nodes for --node-objects), and the join state's ConfigMaps in a namespace of their own.
extension Manifests {
    static func rbacObjects(
        _ o: ManifestOptions, labels serverLabels: Node
    ) -> (
        joinState: [Node], role: Node, binding: Node, clusterRole: Node, clusterBinding: Node
    ) {
        let ns = o.namespace
        let role = object(
            "rbac.authorization.k8s.io/v1", "Role", "edge-tunnel-server", ns, labels: serverLabels,
            extra: [
                (
                    "rules",
                    .sequence([
                        // Exactly what the server's Kubernetes client uses: each replica's Lease and the count of all, and
                        // the Service whose addresses the serving certificate names.
                        map([
                            ("apiGroups", seq([s("coordination.k8s.io")])), ("resources", seq([s("leases")])),
                            ("verbs", seq([s("get"), s("list"), s("watch"), s("create"), s("update"), s("delete")])),
                        ]),
                        map([
                            ("apiGroups", seq([s("")])), ("resources", seq([s("services")])),
                            ("verbs", seq([s("list"), s("watch")])),
                        ]),
                    ])
                )
            ])
        let binding = object(
            "rbac.authorization.k8s.io/v1", "RoleBinding", "edge-tunnel-server", ns, labels: serverLabels,
            extra: bindingToServer(kind: "Role", name: "edge-tunnel-server", namespace: ns))
        // The join state: ConfigMaps in a namespace of their own (every verb the server and `edgetunnel token|node`
        // inside its pod use), so that the server can change no other ConfigMap.
        let joinStateObjects: [Node] =
            o.joinStateClaim != nil
            ? []
            : [
                clusterObject("v1", "Namespace", o.joinStateNamespace, labels: serverLabels, extra: []),
                object(
                    "rbac.authorization.k8s.io/v1", "Role", "edge-tunnel-join-state", o.joinStateNamespace,
                    labels: serverLabels,
                    extra: [
                        (
                            "rules",
                            .sequence([
                                map([
                                    ("apiGroups", seq([s("")])), ("resources", seq([s("configmaps")])),
                                    (
                                        "verbs",
                                        seq([s("get"), s("list"), s("watch"), s("create"), s("update"), s("delete")])
                                    ),
                                ])
                            ])
                        )
                    ]),
                object(
                    "rbac.authorization.k8s.io/v1", "RoleBinding", "edge-tunnel-join-state", o.joinStateNamespace,
                    labels: serverLabels,
                    extra: bindingToServer(kind: "Role", name: "edge-tunnel-join-state", namespace: ns)),
            ]
        // Nodes are cluster-scoped: agents register only as existing Nodes with their Nodes' addresses.
        let clusterRole = clusterObject(
            "rbac.authorization.k8s.io/v1", "ClusterRole", "edge-tunnel-server", labels: serverLabels,
            extra: [
                (
                    "rules",
                    .sequence([
                        map([
                            ("apiGroups", seq([s("")])), ("resources", seq([s("nodes")])),
                            ("verbs", seq([s("list"), s("watch")])),
                        ])
                    ])
                )
            ])
        let clusterBinding = clusterObject(
            "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "edge-tunnel-server", labels: serverLabels,
            extra: bindingToServer(kind: "ClusterRole", name: "edge-tunnel-server", namespace: ns))
        return (joinStateObjects, role, binding, clusterRole, clusterBinding)
    }

    /// A binding's body: the `kind` role `name`, granted to the server's ServiceAccount in `namespace`.
    static func bindingToServer(kind: String, name: String, namespace: String) -> [(String, Node)] {
        [
            ("roleRef", map([("apiGroup", s("rbac.authorization.k8s.io")), ("kind", s(kind)), ("name", s(name))])),
            (
                "subjects",
                seq([
                    map([("kind", s("ServiceAccount")), ("name", s("edge-tunnel-server")), ("namespace", s(namespace))])
                ])
            ),
        ]
    }
}
