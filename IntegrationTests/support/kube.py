"""The stand-in Kubernetes API server's lab (kube_standin.py, run by path): `Lab` starts the stand-in with the RBAC
that `edgetunnel manifests` renders and server replicas that use it, `lab` is its fixture (a test module that uses
it imports it), `join_frame` is a raw JOIN with a fresh CSR, and `edge_1_agent` a real agent of node edge-1 on a
replica."""
import functools
import json
import pathlib
import ssl
import sys
import urllib.request

import pytest
import yaml

from conftest import BIN, run
from support.harness import PYTHON_HELPER_EXITS, Processes, frame, free_port, http_get, wait_until

HERE = pathlib.Path(__file__).resolve().parents[1]  # IntegrationTests/: kube_standin.py runs from there by path


class Lab(Processes):
    def __init__(self, tmp):
        super().__init__(tmp)
        self.pki = self.tmp / "pki"
        self.kube = self.tmp / "kube"
        self.kube.mkdir()
        self.servers = {}
        run(BIN / "edgetunnel", "pki", "init", "--pki-dir", self.pki)
        (self.kube / "token").write_text("token-one\n")
        (self.kube / "admin-token").write_text("admin-token\n")
        self.rbac = server_rbac()
        self.write_rbac(self.rbac)
        self.refusals_expected = False  # a test that makes RBAC refuse the server says so
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
            "Authorization": f"Bearer {(self.kube / 'admin-token').read_text().strip()}",
            "Content-Type": "application/merge-patch+json" if method == "PATCH" else "application/json"})
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return json.loads(response.read())

    def write_rbac(self, rbac):
        """The RBAC objects the stand-in authorizes the server's ServiceAccount with (re-read per request)."""
        partial = self.kube / "rbac.json.partial"
        partial.write_text(json.dumps(rbac))
        partial.replace(self.kube / "rbac.json")

    def rbac_decisions(self):
        """Each request of the server's ServiceAccount that the stand-in's RBAC judged, as a dict (allowed, verb,
        group, resource, namespace, name, source: rbac, or deny for DIR/deny)."""
        path = self.kube / "rbac.log"
        return [json.loads(line) for line in (path.read_text().splitlines() if path.exists() else [])]

    def requests(self):
        path = self.kube / "requests.log"
        return path.read_text().splitlines() if path.exists() else []

    def timeline(self):
        """Every request as (time, method, path, status, Retry-After sent or None, token: current/previous/-)."""
        path = self.kube / "timeline.log"
        rows = []
        for line in (path.read_text().splitlines() if path.exists() else []):
            at, method, url, code, retry, auth = line.split(" ")
            rows.append((float(at), method, url, int(code), None if retry == "-" else int(retry), auth))
        return rows

    def events(self):
        """The DELETED and BOOKMARK events the stand-in sent: (type, resource, name, resourceVersion)."""
        path = self.kube / "events.log"
        return [tuple(line.split(" ")) for line in (path.read_text().splitlines() if path.exists() else [])]


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()
    # After the stop: a replica deletes its Lease as it stops, and that request too must be one RBAC grants.
    refused = [d for d in lab.rbac_decisions() if not d["allowed"] and d["source"] == "rbac"]
    assert lab.refusals_expected or not refused, f"the manifests' RBAC refused the server: {refused}"


# The manifests as `edgetunnel manifests` renders them by default: leases, both address Services, Node objects and the
# join state in ConfigMaps, each with its RBAC (Sources/EdgePlan/Manifests+RBAC.swift).
MANIFESTS = ["manifests", "--mode", "internet", "--image", "x", "--server-address", "a:10262"]
RBAC_KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


@functools.cache
def manifests():
    return tuple(d for d in yaml.safe_load_all(run(BIN / "edgetunnel", *MANIFESTS).stdout) if d)


def server_rbac():
    """What the stand-in authorizes with: the server Deployment's ServiceAccount and every RBAC object rendered (the
    stand-in follows the bindings to the roles, as the API server's authorizer does)."""
    deployment = next(d for d in manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] == "edge-tunnel-server")
    account = {"namespace": deployment["metadata"]["namespace"],
               "name": deployment["spec"]["template"]["spec"]["serviceAccountName"]}
    return {"serviceAccount": account, "objects": [d for d in manifests() if d["kind"] in RBAC_KINDS]}


def join_frame(lab, token, name, ip="127.0.0.1"):
    from support.hostile import csr_for
    return frame(13, 0, json.dumps({"token": token, "nodeName": name, "nodeIPs": [ip],
                                    "csrPEM": csr_for(lab.tmp, name)}).encode())


def edge_1_agent(lab, server, name, agent_dir, token=None):
    """The agent of node edge-1 on `server`: it joins with `token`, or else uses the certificate in `agent_dir`.
    Returns the process and a check of whether it holds its tunnel."""
    meta = free_port()
    args = [BIN / "edge-tunnel-agent", "--node-name", "edge-1", "--server-address", f"127.0.0.1:{server.ports['tunnel']}",
            "--pki-dir", agent_dir, "--meta-port", meta, "--node-ip", "127.0.0.1"]
    if token:
        ca_hash = run(BIN / "edgetunnel", "pki", "ca-hash", "--pki-dir", lab.pki).stdout.strip()
        args += ["--bootstrap-token", token, "--ca-cert-hash", ca_hash]
    proc = lab.spawn(args, name)

    def connected():
        try:
            return http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200
        except OSError:  # its meta port not open yet
            return False
    return proc, connected
