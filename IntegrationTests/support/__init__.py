"""Helpers the end-to-end tests share, by concern: `harness` (processes, clusters, sockets and frames, `read_all`),
`hostile` (the raw peer and the hostile scenarios), `topology` (Express Connect in network namespaces), `kube` (the
stand-in API server's lab), `kubelet` (the kubelet stand-in) and `tunnel` (the test_tunnel_* fixtures). Test modules
import from here, never from one another; a module that uses a fixture defined here imports it by name."""
