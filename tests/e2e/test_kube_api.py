"""Replicas counted by coordination.k8s.io Leases, against a stand-in for the Kubernetes API server
(kube_standin.py: there is no kube-apiserver on these machines; it serves the Lease endpoints the client uses,
with the API reference's JSON shapes, 410 Gone for compacted versions, 401 for a stale token and 403 from RBAC).
"""
import json
import pathlib
import signal
import ssl
import sys
import time
import urllib.request

import pytest

from conftest import BIN, run
from harness import PYTHON_HELPER_EXITS, Proc, free_port, http_get, stop_and_check, wait_until

HERE = pathlib.Path(__file__).resolve().parent


class Lab:
    def __init__(self, tmp):
        self.tmp = pathlib.Path(tmp)
        self.pki = self.tmp / "pki"
        self.kube = self.tmp / "kube"
        self.kube.mkdir()
        self.procs, self.servers = [], {}
        run(BIN / "edgetunnel", "pki", "init", "--pki-dir", self.pki)
        (self.kube / "token").write_text("token-one\n")
        port = free_port()
        self.standin = self.spawn([sys.executable, HERE / "kube_standin.py", self.kube, port], "kube-standin",
                                  clean_exits=PYTHON_HELPER_EXITS)
        wait_until(lambda: (self.kube / "ca.crt").exists(), 10, "the stand-in's CA")
        self.api_url = f"https://127.0.0.1:{port}"
        self.kubeconfig = self.tmp / "kubeconfig"
        self.kubeconfig.write_text(f"""apiVersion: v1
kind: Config
current-context: test
clusters:
- name: standin
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority: {self.kube / "ca.crt"}
users:
- name: edge-tunnel-server
  user:
    tokenFile: {self.kube / "token"}
contexts:
- name: test
  context: {{cluster: standin, user: edge-tunnel-server, namespace: kube-system}}
""")

    def spawn(self, args, name, clean_exits=(0,)):
        proc = Proc(args, self.tmp / f"{name}.log", clean_exits=clean_exits)
        self.procs.append(proc)
        return proc

    def start_server(self, index, *extra, bind="127.0.0.1"):
        ports = {name: free_port() for name in ("tunnel", "secure", "meta", "insecure")}
        proc = self.spawn([
            BIN / "edge-tunnel-server", "--pki-dir", self.pki, "--bind-address", bind, "--server-id", f"r{index}",
            "--tunnel-port", ports["tunnel"], "--secure-port", ports["secure"], "--meta-port", ports["meta"],
            "--insecure-port", ports["insecure"], "--kubeconfig", self.kubeconfig,
            *(extra or ("--lease-namespace", "kube-system"))], f"server-{index}")
        proc.meta = f"http://127.0.0.1:{ports['meta']}"
        proc.ports = ports
        self.servers[index] = proc
        wait_until(lambda: http_get(proc.meta + "/healthz")[0] == 200, 20, f"server r{index}")
        return proc

    def replicas(self, index):
        for line in http_get(self.servers[index].meta + "/metrics")[1].splitlines():
            if line.startswith("edge_tunnel_server_replicas "):
                return int(float(line.split()[1]))
        return None

    def api(self, method, path, body):
        """A request to the stand-in as kubectl would send it (the token, the CA)."""
        context = ssl.create_default_context(cafile=str(self.kube / "ca.crt"))
        request = urllib.request.Request(f"{self.api_url}{path}", data=json.dumps(body).encode(), method=method, headers={
            "Authorization": f"Bearer {(self.kube / 'token').read_text().strip()}",
            "Content-Type": "application/merge-patch+json" if method == "PATCH" else "application/json"})
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return json.loads(response.read())

    def requests(self):
        path = self.kube / "requests.log"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        stop_and_check(lab.procs)


def test_the_replica_count_follows_the_leases(lab):
    """Three replicas each hold a Lease: each counts 3. One stopped deletes its Lease: 2 at once. One killed
    stops renewing: 1 once its Lease expires (15 s). No flag changes."""
    for index in range(3):
        lab.start_server(index)
    wait_until(lambda: all(lab.replicas(i) == 3 for i in range(3)), 20, "every replica counting 3")
    lab.servers[2].stop()
    started = time.monotonic()
    wait_until(lambda: lab.replicas(0) == 2 and lab.replicas(1) == 2, 10, "a stopped replica's Lease gone")
    assert time.monotonic() - started < 5
    lab.servers[1].send_signal(signal.SIGKILL)
    wait_until(lambda: lab.replicas(0) == 1, 25, "a killed replica's Lease expired")
    assert any(line.startswith("DELETE ") and "edge-tunnel-server-r2" in line for line in lab.requests())


def test_a_rotated_token_a_compacted_watch_and_rbac_refusals_are_handled(lab):
    """The token file is re-read for each request (projected tokens rotate); a watch whose version was
    compacted gets 410 and the client lists again; a 403 is logged with the API's own message."""
    server = lab.start_server(0)
    wait_until(lambda: any(line.startswith("WATCH ") for line in lab.requests()), 15, "a watch")
    (lab.kube / "token").write_text("token-two\n")
    rotated = len(lab.requests())
    wait_until(lambda: any(line.startswith("PUT ") and line.endswith(" 200") for line in lab.requests()[rotated:]),
               15, "a renewal with the rotated token")
    assert not any(line.endswith(" 401") for line in lab.requests()[rotated:])
    lists_before = sum(1 for line in lab.requests() if line.startswith("GET ") and "labelSelector" in line)
    (lab.kube / "compact").write_text("")
    wait_until(lambda: sum(1 for line in lab.requests() if line.startswith("GET ") and "labelSelector" in line)
               > lists_before, 20, "a list again after 410 Gone")
    (lab.kube / "deny").write_text("")
    server.expect_log('HTTP 403: leases.coordination.k8s.io is forbidden', timeout=15)
    (lab.kube / "deny").unlink()
    assert server.alive()


def test_the_certificate_follows_the_service_from_loadbalancer_to_clusterip(lab):
    """The source document's private-line step, as one patch of the Service: its addresses go into the serving
    certificate live (same process), and an agent dialing the new ClusterIP connects."""
    lab.api("POST", "/api/v1/namespaces/kube-system/services", {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "x-tunnel-server-svc", "namespace": "kube-system", "labels": {"name": "edge-tunnel-server"}},
        "spec": {"type": "LoadBalancer", "clusterIP": "127.0.0.6", "clusterIPs": ["127.0.0.6"]},
        "status": {"loadBalancer": {"ingress": [{"ip": "127.0.0.5"}]}}})
    server = lab.start_server(0, "--address-service", "kube-system/x-tunnel-server-svc", bind="0.0.0.0")

    def certificate_ips():
        return set(json.loads(http_get(server.meta + "/v1/server")[1])["certificateIPs"])

    wait_until(lambda: {"127.0.0.5", "127.0.0.6"} <= certificate_ips(), 15, "the LoadBalancer's addresses in the certificate")
    token = run(BIN / "edgetunnel", "token", "create", "--pki-dir", lab.pki).stdout.strip()
    ca_hash = run(BIN / "edgetunnel", "pki", "ca-hash", "--pki-dir", lab.pki).stdout.strip()

    def agent(name, address):
        meta = free_port()
        proc = lab.spawn([BIN / "edge-tunnel-agent", "--node-name", name, "--server-address", f"{address}:{server.ports['tunnel']}",
                          "--pki-dir", lab.tmp / f"agent-{name}", "--meta-port", meta, "--bootstrap-token", token,
                          "--ca-cert-hash", ca_hash], f"agent-{name}")
        wait_until(lambda: http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200, 20, f"agent {name} via {address}")
        return proc

    agent("edge-1", "127.0.0.5")
    pid = server.popen.pid
    lab.api("PATCH", "/api/v1/namespaces/kube-system/services/x-tunnel-server-svc", {
        "spec": {"type": "ClusterIP", "clusterIP": "127.0.0.7", "clusterIPs": ["127.0.0.7"]},
        "status": {"loadBalancer": {"ingress": None}}})
    wait_until(lambda: "127.0.0.7" in certificate_ips() and "127.0.0.5" not in certificate_ips(), 15,
               "the certificate to follow the patched Service")
    agent("edge-2", "127.0.0.7")
    assert server.popen.pid == pid and server.alive()


def node(name, *addresses):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]}}


def test_agents_register_only_as_existing_nodes_with_their_nodes_addresses(lab):
    """--node-objects: edge-1's Node reports 127.0.0.11 and it registers with it; edge-2 has no Node until one is
    created, then registers; edge-3's Node reports another address than the one its agent claims: refused.
    Deleting edge-1's Node closes its tunnel."""
    lab.api("POST", "/api/v1/nodes", node("edge-1", "127.0.0.11"))
    lab.api("POST", "/api/v1/nodes", node("edge-3", "10.0.0.3"))
    server = lab.start_server(0, "--node-objects")
    token = run(BIN / "edgetunnel", "token", "create", "--pki-dir", lab.pki, "--node-cidr", "127.0.0.0/8").stdout.strip()
    ca_hash = run(BIN / "edgetunnel", "pki", "ca-hash", "--pki-dir", lab.pki).stdout.strip()
    metas = {}

    def agent(name):
        metas[name] = free_port()
        return lab.spawn([BIN / "edge-tunnel-agent", "--node-name", name, "--node-ip", f"127.0.0.1{name[-1]}",
                          "--server-address", f"127.0.0.1:{server.ports['tunnel']}", "--pki-dir", lab.tmp / f"agent-{name}",
                          "--meta-port", metas[name], "--bootstrap-token", token, "--ca-cert-hash", ca_hash], f"agent-{name}")

    def up(name):
        return http_get(f"http://127.0.0.1:{metas[name]}/readyz")[0] == 200

    for name in ("edge-1", "edge-2", "edge-3"):
        agent(name)
    wait_until(lambda: up("edge-1"), 20, "edge-1 registered")
    server.expect_log("there is no Node object named edge-2 in the cluster", timeout=10)
    server.expect_log("node IP 127.0.0.13 is not among the addresses of Node edge-3 (10.0.0.3)", timeout=10)
    assert not up("edge-2") and not up("edge-3")
    lab.api("POST", "/api/v1/nodes", node("edge-2", "127.0.0.12"))
    wait_until(lambda: up("edge-2"), 40, "edge-2 registered once its Node exists")
    lab.api("DELETE", "/api/v1/nodes/edge-1", {})
    wait_until(lambda: not up("edge-1"), 10, "edge-1's tunnel closed with its Node")
    server.expect_log("the Node object of edge-1 was deleted")
