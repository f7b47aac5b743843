"""Claims of the docs about the server's ports, the Kubernetes objects it follows, replicas, routing and threads
(issue 29, "Claims with no test"), each held to what the docs say against the real binaries: real TLS (openssl,
Python's ssl), real agents or raw agents with real certificates, real callers. Helpers: support/claims.py.

Where a claim lives:
- TLS 1.3 only on 10262, and an operator's certificate there closed: PROTOCOL.md ("TLS 1.3 (nothing older is
  accepted)", "Connections"), OPERATIONS.md ("Ports"); `TLSContexts.tunnelServer`, `TunnelConnectionClassifier`.
- `--replica-warmup`: OPERATIONS.md "Several replicas", PROTOCOL.md; `TunnelServer.replicaWarmingUp`.
- LoadBalancer hostnames and `--node-objects`: OPERATIONS.md "Kubernetes objects the server follows";
  `ServiceAddresses`, `AgentSession.handleHello`.
- A connection bound to its first node: OPERATIONS.md "Ports"; `HostRouter`.
- `--event-loop-threads`: OPERATIONS.md "Threads"; `ServerConfiguration.eventLoopThreads`.
The resuming claims are in test_claims.py, the security claims (lookups, the `nodes.json` lock, the CA secret,
revocation) in test_claims_security.py.
"""
import json
import pathlib
import random
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import BIN, run
from support.claims import (HELLO, HELLO_OK, REFUSED, raw_hello, hello_answer, still_open, server_metric, agent_metric,
                            lose_tunnel_with_a_stream, in_private_mounts, needs_mount_namespaces)
from support.claims import cluster  # noqa: F401  (fixture)
from support.harness import (PYTHON_HELPER_EXITS, connection_end, frame, free_port, http_get, read_head, recv_exact,
                             wait_until)

HERE = pathlib.Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------------
# The tunnel port: TLS 1.3 only; an operator's certificate is closed.

def s_client(port, *extra):
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *map(str, extra)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


def test_the_tunnel_port_speaks_tls_1_3_only(cluster):
    """PROTOCOL.md: "speaks TLS 1.3 (nothing older is accepted)". openssl offering only TLS 1.2 fails the handshake
    on 10262; offering only TLS 1.3 it completes (a joining agent's handshake: no client certificate). The same
    openssl with TLS 1.2 does complete against this server's secure port (1.2 is allowed there), so the refusal is
    the tunnel port's own."""
    c = cluster
    c.start_server()
    old = s_client(c.ports["tunnel"], "-tls1_2", "-CAfile", c.ca)
    assert old.returncode != 0 and "Cipher is (NONE)" in old.stdout, (old.stdout, old.stderr)
    assert "protocol version" in old.stderr.lower() or "alert" in old.stderr.lower(), old.stderr
    new = s_client(c.ports["tunnel"], "-tls1_3", "-CAfile", c.ca)
    assert new.returncode == 0, (new.stdout, new.stderr)
    assert "New, TLSv1.3" in new.stdout and "Verify return code: 0 (ok)" in new.stdout, new.stdout
    secure = s_client(c.ports["secure"], "-tls1_2", "-CAfile", c.ca, "-cert", c.cert, "-key", c.key)
    assert secure.returncode == 0 and "New, TLSv1.2" in secure.stdout, (secure.stdout, secure.stderr)


def test_an_operator_certificate_on_the_tunnel_port_is_closed(cluster):
    """PROTOCOL.md, "Connections": "a certificate of the CA without the agent organisation (an operator's) is
    closed". The operator's certificate completes the TLS handshake (it chains to the CA), and the server closes
    the connection without answering its HELLO, saying why in its log. The same HELLO with a node certificate is
    answered (HELLO_OK), so it is the certificate that is refused."""
    c = cluster
    c.start_server()
    raw = socket.create_connection(("127.0.0.1", c.ports["tunnel"]), timeout=10)
    tls = c.tls_context(c.cert, c.key).wrap_socket(raw)
    tls.sendall(frame(HELLO, 0, json.dumps({"version": 3, "nodeName": "operator", "nodeIPs": [],
                                            "capabilities": []}).encode()))
    started = time.monotonic()
    tls.settimeout(5)
    try:
        answer = tls.recv(65536)
    except socket.timeout:
        raise AssertionError("the connection of an operator's certificate was still open after 5 s") from None
    except (ConnectionError, ssl.SSLError, OSError):
        answer = b""  # closed (a reset, or an end without close_notify)
    assert answer == b"", f"the server answered an operator's HELLO: {answer!r}"
    assert time.monotonic() - started < 2
    tls.close()
    c.server.expect_log("tunnel connection refused: certificate")
    assert "is not an agent certificate" in c.server.own_text()
    assert c.agents() == []
    frame_type, ok, agent = raw_hello(c, "edge-1")
    assert frame_type == HELLO_OK, ok
    agent.close()


# ---------------------------------------------------------------------------------------------------------------
# The Kubernetes API (kube_standin.py stands in for it): Node objects, Services.

class KubeAPI:
    """The stand-in API server for a cluster's server (`--kubeconfig`), and requests to it as an admin's kubectl."""

    def __init__(self, c):
        self.dir = c.tmp / "kube"
        self.dir.mkdir()
        (self.dir / "token").write_text("server-token\n")
        (self.dir / "admin-token").write_text("admin-token\n")
        port = free_port()
        c.spawn([sys.executable, HERE / "kube_standin.py", self.dir, port], "kube-standin",
                clean_exits=PYTHON_HELPER_EXITS)
        wait_until(lambda: (self.dir / "ca.crt").exists(), 10, "the stand-in's CA")
        self.url = f"https://127.0.0.1:{port}"
        self.kubeconfig = c.tmp / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "standin", "cluster": {"server": self.url,
                                                         "certificate-authority": str(self.dir / "ca.crt")}}],
            "users": [{"name": "server", "user": {"tokenFile": str(self.dir / "token")}}],
            "contexts": [{"name": "test", "context": {"cluster": "standin", "user": "server",
                                                      "namespace": "kube-system"}}]}))

    def api(self, method, path, body=None):
        import urllib.request
        context = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
        request = urllib.request.Request(
            self.url + path, data=None if body is None else json.dumps(body).encode(), method=method,
            headers={"Authorization": "Bearer admin-token",
                     "Content-Type": "application/merge-patch+json" if method == "PATCH" else "application/json"})
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return json.loads(response.read())

    def requests(self):
        path = self.dir / "requests.log"
        return path.read_text().splitlines() if path.exists() else []


def node_object(name, *addresses):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]}}


def test_deleting_a_node_object_ends_its_suspended_streams(cluster):
    """PROTOCOL.md: "Revoking or resetting the node, deleting its Node object ... end suspended streams at once".
    With --node-objects, a raw agent of Node edge-1 loses its tunnel with a stream open; the stream waits; the Node
    is deleted: the waiting caller's connection is reset at once (the watch event), not after the 30-s grace."""
    c = cluster
    kube = KubeAPI(c)
    kube.api("POST", "/api/v1/nodes", node_object("edge-1"))
    c.start_server("--kubeconfig", kube.kubeconfig, "--node-objects")
    wait_until(lambda: hello_answer(c, "edge-1", version=2) == HELLO_OK, 10, "the Node objects listed")
    _, _, sock = lose_tunnel_with_a_stream(c, "edge-1")
    assert still_open(sock, 0.5)
    kube.api("DELETE", "/api/v1/nodes/edge-1")
    deleted = time.monotonic()
    assert connection_end(sock, timeout=3) == "reset"
    print(f"the suspended stream ended {time.monotonic() - deleted:.2f} s after the Node's deletion")
    assert time.monotonic() - deleted < 2
    c.server.expect_log("the Node object of edge-1 was deleted: ending its suspended streams")
    wait_until(lambda: server_metric(c, "edge_tunnel_server_suspended_tunnels") == 0, 5, "no suspended tunnel")


def test_with_node_objects_registrations_are_refused_until_the_first_list(cluster):
    """OPERATIONS.md, `--node-objects`: "Until the first list of Nodes arrives, registrations are refused with a
    reason (agents retry)". The API server refuses the server's requests (RBAC says no) when it starts: a HELLO of
    edge-1, whose Node exists, is refused with the reason, again and again; once the API answers, the next list
    lets the same HELLO in."""
    c = cluster
    kube = KubeAPI(c)
    kube.api("POST", "/api/v1/nodes", node_object("edge-1"))
    (kube.dir / "deny").touch()
    c.start_server("--kubeconfig", kube.kubeconfig, "--node-objects")
    for _ in range(3):
        frame_type, answer, tls = raw_hello(c, "edge-1")
        tls.close()
        assert frame_type == REFUSED, answer
        assert "has not yet loaded the cluster's Node objects" in answer["reason"], answer
        time.sleep(0.3)
    assert any(line.startswith("GET /api/v1/nodes") and line.endswith(" 403") for line in kube.requests()), \
        kube.requests()
    (kube.dir / "deny").unlink()
    wait_until(lambda: hello_answer(c, "edge-1") == HELLO_OK, 15, "the HELLO accepted once the Nodes are listed")


def test_a_loadbalancer_hostname_is_in_the_certificate_and_agents_dial_it(cluster):
    """OPERATIONS.md, `--address-service`: "the serving certificate also names those Services' addresses
    (ClusterIPs, externalIPs, LoadBalancer ingress IPs and hostnames)". A LoadBalancer whose ingress is a hostname
    (as on AWS-style load balancers): openssl sees it among the served certificate's DNS names, and a real agent that
    dials that name (resolved by its /etc/hosts) verifies the server's certificate by it and registers."""
    needs_mount_namespaces()
    c = cluster
    kube = KubeAPI(c)
    lb = f"tunnel-{random.randrange(1 << 30):x}.lb.example.com"
    kube.api("POST", "/api/v1/namespaces/kube-system/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "x-tunnel-server-svc", "namespace": "kube-system"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.7.7", "clusterIPs": ["10.96.7.7"]},
        "status": {"loadBalancer": {"ingress": [{"hostname": lb}]}}})
    c.start_server("--kubeconfig", kube.kubeconfig, "--address-service", "kube-system/x-tunnel-server-svc")
    # The Service is listed by the server's watch after it starts listening: its names join the certificate then
    # (within a second or two; a loaded CI machine took longer than the first request once).
    def served():
        return json.loads(http_get(c.meta_url("/v1/server"))[1])

    wait_until(lambda: lb in served()["certificateDNSNames"] and "10.96.7.7" in served()["certificateIPs"], 15,
               "the LoadBalancer's hostname and ClusterIP in the serving certificate")
    shown = s_client(c.ports["tunnel"], "-tls1_3", "-servername", lb)
    end = "-----END CERTIFICATE-----"
    pem = shown.stdout[shown.stdout.index("-----BEGIN CERTIFICATE-----"):shown.stdout.index(end) + len(end)]
    san = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=pem, capture_output=True,
                         text=True, check=True).stdout
    assert f"DNS:{lb}" in san, san
    hosts = c.tmp / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {lb}\n")
    meta = free_port()
    agent = c.spawn(in_private_mounts([(hosts, "/etc/hosts")], [
        BIN / "edge-tunnel-agent", "--node-name", "edge-1", "--node-ip", "127.0.0.1",
        "--server-address", f"{lb}:{c.ports['tunnel']}", "--pki-dir", c.tmp / "agent-edge-1", "--meta-port", meta,
        "--bootstrap-token", c.token(), "--ca-cert-hash", c.ca_hash]), "agent-edge-1")
    wait_until(lambda: http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200, 20, "the agent registered via the name")
    assert [a["nodeName"] for a in c.agents()] == ["edge-1"]
    assert "certificate does not name" not in agent.own_text()


# ---------------------------------------------------------------------------------------------------------------
# Replicas, routing, threads.

def test_replica_warmup_holds_readiness_at_most_that_long(cluster):
    """OPERATIONS.md: `--replica-warmup` (default 60s, at most 1h): "with N > 1, a replica's /readyz waits until every
    joined node holds a tunnel to it, at most this long. /readyz/listeners does not wait." Node edge-1 has joined;
    a replica of two starts with --replica-warmup 3s while edge-1 is away: /readyz says why it is not ready, and
    turns ready 3 s after the start (not before, and not much later), /readyz/listeners at once. With the 1h
    maximum, a replica waits for edge-1 itself and is ready once it holds edge-1's tunnel; 1h and a second is
    refused."""
    c = cluster
    c.start_server()
    c.start_agent("edge-1").stop()
    c.server.stop()
    started = time.monotonic()
    c.start_server("--server-count", "2", "--replica-warmup", "3s", wait=False)
    wait_until(lambda: http_get(c.meta_url("/readyz/listeners"))[0] == 200, 20, "the listeners up")
    listeners_after = time.monotonic() - started
    status, body = http_get(c.meta_url("/readyz"))
    assert status == 503, (status, body)
    assert "warming up: 0 of 1 joined nodes hold a tunnel to this replica (missing: edge-1)" in body, body
    wait_until(lambda: http_get(c.meta_url("/readyz"))[0] == 200, 10, "ready once the warm-up is over")
    ready_after = time.monotonic() - started
    print(f"listeners after {listeners_after:.2f} s, ready after {ready_after:.2f} s")
    assert 3.0 <= ready_after <= 4.5, ready_after
    c.server.stop()
    c.start_server("--server-count", "2", "--replica-warmup", "1h", wait=False)
    wait_until(lambda: http_get(c.meta_url("/readyz/listeners"))[0] == 200, 20, "the listeners up")
    assert http_get(c.meta_url("/readyz"))[0] == 503
    c.start_agent("edge-1", join=False, pki=c.tmp / "agent-edge-1")
    wait_until(lambda: http_get(c.meta_url("/readyz"))[0] == 200, 10, "ready once edge-1 holds a tunnel")
    refused = run(BIN / "edge-tunnel-server", "--pki-dir", c.pki, "--replica-warmup", "3601s", check=False)
    assert refused.returncode == 1 and "--replica-warmup must be between 0s and 1h" in refused.stderr, refused.stderr


class Recorder:
    """An HTTP/1.1 service on the edge node that answers every request on a connection with its own name and the
    Host it was sent, keeping the connection open (keep-alive)."""

    def __init__(self, name):
        self.name, self.hosts = name, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            while True:
                head = read_head(conn)
                if not head.endswith(b"\r\n\r\n"):
                    return
                host = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                            if line.lower().startswith(b"host:"))
                self.hosts.append(host)
                body = f"{self.name} got Host {host}\n".encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self):
        self.listener.close()


def read_response(sock):
    head = read_head(sock)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    return head.split(b"\r\n", 1)[0], recv_exact(sock, length).decode()


def test_a_connection_stays_bound_to_the_node_of_its_first_request(cluster):
    """OPERATIONS.md, "Ports": "A connection stays bound to the node of its first request." Two nodes, each with a
    service: on one keep-alive connection to the insecure port, a request for edge-a's service, then one whose Host
    names edge-b's. The second goes where the first went, to edge-a's service on the same stream; edge-b's service
    and agent see nothing. A new connection for edge-b reaches edge-b."""
    c = cluster
    a, b = Recorder("a"), Recorder("b")
    try:
        c.start_server()
        agent_a = c.start_agent("edge-a", "--allow", f"127.0.0.1:{a.port}", ips=("127.0.0.1",))
        agent_b = c.start_agent("edge-b", "--allow", f"127.0.0.1:{b.port}", ips=("127.0.0.2",))
        with socket.create_connection(("127.0.0.1", c.ports["insecure"]), timeout=10) as sock:
            sock.sendall(f"GET /one HTTP/1.1\r\nHost: edge-a:{a.port}\r\n\r\n".encode())
            assert read_response(sock) == (b"HTTP/1.1 200 OK", f"a got Host edge-a:{a.port}\n")
            sock.sendall(f"GET /two HTTP/1.1\r\nHost: edge-b:{b.port}\r\n\r\n".encode())
            assert read_response(sock) == (b"HTTP/1.1 200 OK", f"a got Host edge-b:{b.port}\n")
        assert b.hosts == [] and agent_metric(agent_b, "edge_tunnel_agent_bytes_total") == 0
        assert agent_metric(agent_a, "edge_tunnel_agent_bytes_total") > 0
        with socket.create_connection(("127.0.0.1", c.ports["insecure"]), timeout=10) as sock:
            sock.sendall(f"GET /three HTTP/1.1\r\nHost: edge-b:{b.port}\r\n\r\n".encode())
            assert read_response(sock) == (b"HTTP/1.1 200 OK", f"b got Host edge-b:{b.port}\n")
    finally:
        a.close()
        b.close()


def event_loop_threads(pid):
    """The server's event-loop threads (NIO names them NIO-ELT-<group>-#<n>)."""
    return sorted(p.read_text().strip() for p in pathlib.Path(f"/proc/{pid}/task").glob("*/comm")
                  if p.read_text().startswith("NIO-ELT-"))


def with_cpuset(cpus, args):
    """`args` in a mount namespace of its own whose /sys/fs/cgroup is a stand-in naming only the cgroup cpuset `cpus`,
    as a container limited to those cores sees it (SwiftNIO counts cores from there, a tmpfs there as cgroup v1)."""
    script = ('mount -t tmpfs cgroup-standin /sys/fs/cgroup && mkdir /sys/fs/cgroup/cpuset && '
              'echo "$1" > /sys/fs/cgroup/cpuset/cpuset.cpus && shift && exec "$0" "$@"')
    return ["unshare", "--mount", "sh", "-c", script, str(args[0]), cpus, *map(str, args[1:])]


@pytest.mark.parametrize("cpus,threads", [("0", 1), ("0-2", 1), ("0-7", 4), ("0-9", 5)])
def test_the_event_loop_threads_default_to_half_the_cores(cluster, cpus, threads):
    """OPERATIONS.md: `--event-loop-threads N` (default: half the CPU cores, at least 1). The server runs where its
    cgroup's cpuset names `cpus`: it starts `threads` event-loop threads. And `--event-loop-threads 3` gives 3."""
    needs_mount_namespaces()
    c = cluster
    args = [BIN / "edge-tunnel-server", "--pki-dir", c.pki, "--bind-address", "127.0.0.1",
            "--tunnel-port", c.ports["tunnel"], "--secure-port", c.ports["secure"], "--meta-port", c.ports["meta"],
            "--insecure-port", c.ports["insecure"]]
    for extra, expected in (((), threads), (("--event-loop-threads", "3"), 3)):
        c.server = c.spawn(with_cpuset(cpus, [*args, *extra]), "server")
        wait_until(lambda: http_get(c.meta_url("/readyz"))[0] == 200, 20, "server /readyz")
        found = event_loop_threads(c.server.popen.pid)
        assert len(found) == expected, (extra, found)
        c.server.stop()
