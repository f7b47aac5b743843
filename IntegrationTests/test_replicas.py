"""Three server replicas as one tunnel, tested like production: each replica in its own network namespace (a
"pod"), a ClusterIP made as kube-proxy makes one in iptables mode (random DNAT per endpoint, rules rewritten
when endpoints change), 20 agents in an edge namespace dialing it, callers using it.

As Kubernetes would run it, the agents' port (10262) lists every live replica (`publishNotReadyAddresses`), and
the callers' port (10263) only replicas whose /readyz says ok: a replica is ready once every joined node holds
a tunnel to it. The test drives the endpoints the way the endpoints controller and kube-proxy would.
"""
import json
import math
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import BIN, run
from support.harness import PYTHON_HELPER_EXITS, Processes, holds_for, wait_until
from netns import ClusterNetwork

HERE = pathlib.Path(__file__).resolve().parent
EDGE_PORT = 18080
AGENTS = 20
REPLICAS = 3
# How long until every agent holds a tunnel to every replica. The agents' dials of the Service land on random
# replicas; an agent missing k replicas asks with up to 2k+1 connections at once which replica each reached (a line
# before TLS), and goes on with one it lacks; a round that reached only held replicas waits the pace those replicas
# ask for (1 s for 20 agents), and a new count or a lost replica is acted on after a random moment of up to 5 s.
# docs/PROTOCOL.md states what was measured here: 11-19 s from cold (joins included), 8-9 s after a killed replica
# returns; and 13-25 s to reach a fourth replica. Each bound is that with room for a loaded machine, and well under
# the 60 s a returned replica once took in CI, when agents backed off to 10 s (a bound of 60 s let that bug pass).
COLD_ATTACHED_S = 30  # all 20 agents on all 3 replicas, from their start (joins included): 11-19 s
RETURNED_ATTACHED_S = 20  # every agent on a replica that returned (killed, restarted, or out of reach): 8-9 s
NEW_REPLICA_ATTACHED_S = 40  # every agent on a fourth replica once the count says 4: 13-25 s
# After a scale-down has converged (every agent holds all of the replicas left), no agent dials the agents' Service
# for this long: it stopped looking for the removed replicas.
QUIET_AFTER_SCALE_DOWN_S = 10


class Replicas(Processes):
    """The shared PKI on the host; replicas in the pods, agents and an edge service in `edge`. The harness's
    `Processes`: `close` stops every process, last started first, and fails if one of them ended badly (see
    harness.Proc)."""

    def __init__(self, net, tmp):
        super().__init__(tmp)
        self.net = net
        self.pki = self.tmp / "pki"
        self.servers = {}
        run(BIN / "edgetunnel", "pki", "init", "--pki-dir", self.pki)
        run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", self.pki, "--name", "operator")
        self.token = run(BIN / "edgetunnel", "token", "create", "--pki-dir", self.pki).stdout.strip()
        self.ca_hash = run(BIN / "edgetunnel", "pki", "ca-hash", "--pki-dir", self.pki).stdout.strip()
        self.nodes = [f"edge-{i}" for i in range(1, AGENTS + 1)]
        self.restarts = 0
        self.kube = None

    def start_kube_standin(self):
        """The stand-in API server (no kube-apiserver runs here) in the router, reachable from every pod."""
        self.kube = self.tmp / "kube"
        self.kube.mkdir()
        (self.kube / "token").write_text("token\n")
        self.kube_port = 16443
        gateways = ",".join(f"10.250.{i + 1}.1" for i in range(len(self.net.pods)))
        self.spawn(self.net.router, [sys.executable, HERE / "kube_standin.py", self.kube, self.kube_port, "0.0.0.0",
                                     gateways], "kube-standin", clean_exits=PYTHON_HELPER_EXITS)
        wait_until(lambda: (self.kube / "ca.crt").exists(), 10, "the stand-in API server")

    def spawn(self, ns, args, name, clean_exits=(0,)):
        """`args` run in namespace `ns`, logging to `<tmp>/<name>.log`."""
        return super().spawn(["ip", "netns", "exec", ns, *args], name, clean_exits=clean_exits)

    def config(self, index):
        return self.tmp / f"server-{index}.yaml"

    def start_server(self, index, count=REPLICAS):
        """Replica `index` in its pod; the shared PKI folder holds the CA, tokens and nodes.json. The replica
        count is in its config file (reloadable), as the manifests' ConfigMap has it — or, with `self.kube` set,
        it comes from the replicas' Leases in the stand-in API server."""
        self.restarts += 1
        if self.kube:
            kubeconfig = self.tmp / f"kubeconfig-{index}"
            kubeconfig.write_text(
                f"clusters: [{{name: c, cluster: {{server: 'https://10.250.{index + 1}.1:{self.kube_port}', "
                f"certificate-authority: '{self.kube / 'ca.crt'}'}}}}]\n"
                f"users: [{{name: u, user: {{tokenFile: '{self.kube / 'token'}'}}}}]\n"
                "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n")
            self.config(index).write_text(f"leaseNamespace: kube-system\nkubeconfig: {kubeconfig}\n")
        elif not self.config(index).exists():
            self.config(index).write_text(f"serverCount: {count}\n")
        self.servers[index] = self.spawn(self.net.pods[index], [
            BIN / "edge-tunnel-server", "--pki-dir", self.pki, "--server-id", f"replica-{index}",
            "--config", self.config(index), "--cert-ips", ClusterNetwork.CLUSTER_IP,
            # Several loops, as on any machine beyond 2 cores: resumed streams move between loops (issue 25 item 4).
            "--event-loop-threads", "4"], f"server-{index}-{self.restarts}")
        wait_until(lambda: self.meta(index, "/healthz") == "ok\n", 20, f"replica {index} listening")

    def set_count(self, count):
        """A new replica count in every config file, applied with SIGHUP (the reloader also polls the file)."""
        for index, server in self.servers.items():
            self.config(index).write_text(f"serverCount: {count}\n")
            if server.alive():
                server.send_signal(signal.SIGHUP)

    def agent_views(self):
        """Each agent's /readyz: which replicas it says it holds."""
        return [self.net.run(self.net.edge, "curl", "-s", "--max-time", "3", f"http://127.0.0.1:{20000 + i}/readyz",
                             check=False).stdout for i in range(AGENTS)]

    def meta(self, index, path):
        return self.net.run(self.net.pods[index], "curl", "-s", "--max-time", "3", f"http://127.0.0.1:10265{path}",
                            check=False).stdout

    def ready(self, index):
        return self.meta(index, "/readyz") == "ok\n"

    def attached(self, index):
        agents = json.loads(self.meta(index, "/v1/agents") or "{}").get("agents", [])
        return sorted(a["nodeName"] for a in agents)

    def all_attached(self, indexes):
        return all(self.attached(i) == sorted(self.nodes) for i in indexes)

    def streams(self, index):
        """The streams replica `index` carries, over all of its agents."""
        agents = json.loads(self.meta(index, "/v1/agents") or "{}").get("agents", [])
        return sum(a["streams"] for a in agents)

    def agent_metric(self, i, name):
        """A metric of agent `i` (edge-{i+1}), by its exact name; None if it has no such line."""
        text = self.net.run(self.net.edge, "curl", "-s", "--max-time", "3", f"http://127.0.0.1:{20000 + i}/metrics",
                            check=False).stdout
        return metric_value(text, name)

    def service_connections(self, port=10262):
        """How many connections were opened to CLUSTER_IP:port since the Service was made: the packets its jump rule
        in the router's nat PREROUTING matched (only a connection's first packet goes through the nat table)."""
        out = self.net.run(self.net.router, "iptables", "-w", "-t", "nat", "-L", "PREROUTING", "-v", "-x", "-n").stdout
        counts = [int(line.split()[0]) for line in out.splitlines() if f"SVC-{port}" in line.split()]
        assert len(counts) == 1, out
        return counts[0]

    def assert_no_agent_dials_the_service(self):
        """Scale-down converged: for QUIET_AFTER_SCALE_DOWN_S no new connection reaches the agents' Service. The
        agents only ever dial the Service, so this is where an agent still probing for a removed replica shows (it
        would probe every pace, about 1 s)."""
        before = self.service_connections()
        assert before >= AGENTS, f"the counter saw {before} connections: every agent dialed the Service at least once"
        holds_for(lambda: self.service_connections() == before, QUIET_AFTER_SCALE_DOWN_S,
                  f"no agent dialing {ClusterNetwork.CLUSTER_IP}:10262 after the scale-down (connections so far: "
                  f"{before})", interval=0.5)

    def start_edge(self):
        self.spawn(self.net.edge, [sys.executable, HERE / "edge_service.py", "127.0.0.1", EDGE_PORT], "edge-service",
                   clean_exits=PYTHON_HELPER_EXITS)
        # Listening before any agent can carry a request to it (Python starts slower than an agent connects).
        wait_until(lambda: self.net.run(self.net.edge, "curl", "-s", "--max-time", "2",
                                        f"http://127.0.0.1:{EDGE_PORT}/hello", check=False).returncode == 0, 20,
                   "the edge service to listen")
        for i, node in enumerate(self.nodes):
            self.spawn(self.net.edge, [
                BIN / "edge-tunnel-agent", "--node-name", node, "--server-address", f"{ClusterNetwork.CLUSTER_IP}:10262",
                "--pki-dir", self.tmp / f"agent-{node}", "--meta-port", 20000 + i, "--bootstrap-token", self.token,
                "--ca-cert-hash", self.ca_hash, "--allow", f"127.0.0.1:{EDGE_PORT}", "--log-level", "debug"], f"agent-{node}")

    def client(self, mode, *extra, proxy=None, timeout=300):
        return [*("ip", "netns", "exec", self.net.edge, sys.executable, HERE / "replica_client.py", mode),
                "--proxy", proxy or f"{ClusterNetwork.CLUSTER_IP}:10263", "--ca", self.pki / "ca.crt",
                "--cert", self.pki / "operator.crt", "--key", self.pki / "operator.key",
                "--nodes", ",".join(self.nodes), "--port", EDGE_PORT, *extra]

    def requests(self, count, threads=4):
        out = subprocess.run([str(a) for a in self.client("requests", "--count", count, "--threads", threads)],
                             capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout)


def metric_value(text, name):
    """The value of the metric line named exactly `name` (labels included), None if there is none."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.rsplit(" ", 1)[0] == name]
    assert len(values) <= 1, (name, values)
    return values[0] if values else None


@pytest.fixture
def cluster(tmp_path):
    with ClusterNetwork(REPLICAS + 1) as net:  # the last pod stays empty until a test scales up
        r = Replicas(net, tmp_path)
        try:
            for index in range(REPLICAS):
                r.start_server(index)
            net.set_endpoints(10262, range(REPLICAS))
            started = time.monotonic()
            r.start_edge()
            wait_until(lambda: r.all_attached(range(REPLICAS)), COLD_ATTACHED_S, "every agent on every replica")
            r.attach_seconds = time.monotonic() - started
            wait_until(lambda: all(r.ready(i) for i in range(REPLICAS)), 10, "every replica ready")
            net.set_endpoints(10263, range(REPLICAS))
            yield r
        finally:
            r.close()


def test_every_agent_reaches_every_replica_and_no_request_lands_where_its_node_is_not(cluster):
    """20 agents, 3 replicas behind random DNAT: every node is registered on every replica (each agent held
    three tunnels within COLD_ATTACHED_S), and 1,000 requests through the ClusterIP get zero 502s. Before, each
    agent held one tunnel and about half of the requests landed on a replica without their node."""
    print(f"all {AGENTS} agents on all {REPLICAS} replicas after {cluster.attach_seconds:.1f} s")
    result = cluster.requests(1000)
    assert result["failures"] == 0 and result["ok"] == 1000, result
    for index in range(REPLICAS):
        metrics = cluster.meta(index, "/metrics")
        assert metric_value(metrics, "edge_tunnel_server_replicas") == REPLICAS, metrics
    # The line before TLS names the replica and the pace it asks of agents that already hold it: its 20 agents
    # over 1,000 probes a second is under the 500-ms floor.
    probe = ("import socket,sys; s=socket.create_connection((sys.argv[1], 10262), 3); s.sendall(b'ETREPLICA?\\n');"
             "print(s.makefile('rb').readline().decode(), end='')")
    answer = cluster.net.run(cluster.net.edge, sys.executable, "-c", probe, cluster.net.pod_ip(1)).stdout
    assert answer == "ETREPLICA replica-1 pace=500\n"


def test_a_killed_replica_fails_no_other_stream_and_its_return_is_attached(cluster):
    """kill -9 one replica mid-traffic: streams held through the other two go on, new requests succeed once
    its endpoint is removed, and when it returns every agent attaches to it again."""
    net = cluster.net
    holders_started = time.monotonic()
    holders = [subprocess.Popen([str(a) for a in cluster.client(
        "hold", "--streams", 4, "--seconds", 12, proxy=f"{net.pod_ip(i)}:10263")], stdout=subprocess.PIPE, text=True)
        for i in (0, 2)]
    wait_until(lambda: cluster.streams(0) >= 4 and cluster.streams(2) >= 4, 10,
               "the held streams open on replicas 0 and 2")
    cluster.servers[1].send_signal(signal.SIGKILL)
    # Each stream's seconds are counted from its own start, after the holders started: from this one on, every
    # second of every stream is after the kill.
    after_kill_second = math.ceil(time.monotonic() - holders_started)
    net.set_endpoints(10262, [0, 2])
    net.set_endpoints(10263, [0, 2])
    after_kill = cluster.requests(200)
    held = [json.loads(p.communicate(timeout=60)[0]) for p in holders]
    assert 12 - after_kill_second >= 5, f"the kill came {after_kill_second} s into 12-s streams: too late to judge"
    for streams in held:
        for stream in streams:
            assert stream["ended"] is None, stream
            assert all(count > 0 for count in stream["per_second"][after_kill_second:]), (after_kill_second, stream)
    assert after_kill["failures"] == 0, after_kill
    cluster.start_server(1)
    net.set_endpoints(10262, [0, 1, 2])
    started = time.monotonic()
    wait_until(lambda: cluster.ready(1), RETURNED_ATTACHED_S, "the returned replica ready (every agent attached)")
    print(f"every agent attached to the returned replica after {time.monotonic() - started:.1f} s")
    assert cluster.attached(1) == sorted(cluster.nodes)
    net.set_endpoints(10263, [0, 1, 2])
    assert cluster.requests(300)["failures"] == 0


def test_a_rolling_restart_fails_no_request(cluster, tmp_path):
    """Each replica in turn: out of the callers' endpoints, SIGTERM (it drains), a new process, back in the
    agents' endpoints, and in the callers' once ready. Requests keep flowing the whole time: none fails."""
    net = cluster.net
    stop_file = tmp_path / "stop"
    callers = subprocess.Popen([str(a) for a in cluster.client("requests", "--threads", 3, "--stop-file", stop_file)],
                               stdout=subprocess.PIPE, text=True)
    try:
        for index in range(REPLICAS):
            others = [i for i in range(REPLICAS) if i != index]
            net.set_endpoints(10263, others)
            net.set_endpoints(10262, others)
            time.sleep(1)
            cluster.servers[index].stop()
            cluster.start_server(index)
            net.set_endpoints(10262, range(REPLICAS))
            wait_until(lambda: cluster.ready(index), RETURNED_ATTACHED_S, f"replica {index} ready after its restart")
            net.set_endpoints(10263, range(REPLICAS))
            time.sleep(2)
    finally:
        stop_file.write_text("stop")
        result = json.loads(callers.communicate(timeout=60)[0])
    assert result["ok"] > 100 and result["failures"] == 0, result


def test_scaling_three_to_four_to_two_converges_without_a_restart(cluster):
    """The count changes in the replicas' config (as a ConfigMap edit would): 3 -> 4 with a new replica in the
    fourth pod, then 4 -> 2 with two replicas stopped. The servers announce each count (SERVER_COUNT); the agents
    dial the new replica, then stop dialing: every agent says it holds 2 of 2, then none dials the Service any more
    (no probe for the removed replicas), and requests keep succeeding."""
    net = cluster.net
    cluster.start_server(3, count=4)
    net.set_endpoints(10262, range(4))
    cluster.set_count(4)
    started = time.monotonic()
    wait_until(lambda: cluster.ready(3), NEW_REPLICA_ATTACHED_S, "every agent attached to the fourth replica")
    print(f"3 -> 4: every agent on the new replica after {time.monotonic() - started:.1f} s")
    assert all("(4 of 4 server replicas)" in view for view in cluster.agent_views()), cluster.agent_views()
    net.set_endpoints(10263, range(4))
    assert cluster.requests(200)["failures"] == 0

    net.set_endpoints(10263, [0, 1])
    net.set_endpoints(10262, [0, 1])
    for index in (2, 3):
        cluster.servers[index].stop()
    cluster.set_count(2)
    wait_until(lambda: all("(2 of 2 server replicas)" in view for view in cluster.agent_views()), 30,
               "every agent holding exactly the two replicas left")
    assert cluster.attached(0) == cluster.attached(1) == sorted(cluster.nodes)
    cluster.assert_no_agent_dials_the_service()
    assert cluster.requests(200)["failures"] == 0


def test_scaling_through_leases_converges_with_no_flag_changed(tmp_path):
    """The replicas count each other by their Leases in a stand-in API server (in the router namespace): 3
    replicas, then a fourth started (its Lease appears), then two stopped (their Leases deleted). No count is
    configured anywhere; every agent ends up holding exactly the replicas that run, and stops dialing for more."""
    with ClusterNetwork(4) as net:
        r = Replicas(net, tmp_path)
        try:
            r.start_kube_standin()
            for index in range(3):
                r.start_server(index)
            net.set_endpoints(10262, range(3))
            r.start_edge()
            wait_until(lambda: r.all_attached(range(3)), COLD_ATTACHED_S, "every agent on the three replicas")
            wait_until(lambda: all("(3 of 3 server replicas)" in v for v in r.agent_views()), 20, "agents counting 3")
            r.start_server(3)
            net.set_endpoints(10262, range(4))
            wait_until(lambda: r.all_attached(range(4)), NEW_REPLICA_ATTACHED_S, "every agent on the fourth replica")
            assert all("(4 of 4 server replicas)" in v for v in r.agent_views()), r.agent_views()
            net.set_endpoints(10262, [0, 1])
            for index in (2, 3):
                r.servers[index].stop()
            wait_until(lambda: all("(2 of 2 server replicas)" in v for v in r.agent_views()), 30,
                       "every agent holding exactly the two replicas left")
            r.assert_no_agent_dials_the_service()
            net.set_endpoints(10263, [0, 1])
            assert r.requests(200)["failures"] == 0
        finally:
            r.close()


def test_an_outage_of_the_agents_path_resumes_streams_on_every_replica_and_ends_the_unreachable_ones_loudly(cluster):
    """Follow streams through each of the three replicas, then an outage in which no agent reaches any replica (the
    router drops the agents' port; the callers' port stays up) until every agent holding streams has found its
    three tunnels lost, and replica 1 gone from the agents' endpoints when the path returns. Every agent resumes
    its suspended tunnels on replicas 0 and 2, each reached by its own dial of the ClusterIP: their streams pause
    across the whole outage and then end whole, line by line. Replica 1 cannot be reached
    within the grace period: its streams end with a reset, never short and clean, nor with an orderly close that a
    client which ignores a missing close_notify takes as complete (issue 16)."""
    net = cluster.net
    lines = 500  # 25 s of lines: they run across the outage
    fetchers = {i: subprocess.Popen([str(a) for a in cluster.client(
        "fetch", "--streams", 4, "--lines", lines, proxy=f"{net.pod_ip(i)}:10263")], stdout=subprocess.PIPE, text=True)
        for i in range(REPLICAS)}
    wait_until(lambda: all(cluster.streams(i) >= 4 for i in range(REPLICAS)), 20,
               "the follow streams open on every replica")
    # The streams go through edge-1 .. edge-4 (stream k through node k % AGENTS): one on each replica per agent.
    holders = range(4)
    drop = [["-p", "tcp", "--dport", "10262", "-j", "DROP"], ["-p", "tcp", "--sport", "10262", "-j", "DROP"]]
    for rule in drop:
        net.run(net.router, "iptables", "-w", "-I", "FORWARD", *rule)
    dropped = time.monotonic()
    try:
        # The outage lasts until every agent holding streams has found its three tunnels lost (1.5 s while data
        # moves, issue 26) and suspended them: then their streams wait to resume.
        wait_until(lambda: all(cluster.agent_metric(i, "edge_tunnel_agent_suspended_tunnels") == REPLICAS
                               for i in holders), 30, "every agent holding streams to suspend its three tunnels")
        net.set_endpoints(10262, [0, 2])
    finally:
        for rule in drop:
            net.run(net.router, "iptables", "-w", "-D", "FORWARD", *rule)
    outage = time.monotonic() - dropped
    print(f"outage: {outage:.1f} s")
    results = {i: json.loads(p.communicate(timeout=150)[0]) for i, p in fetchers.items()}
    for index in (0, 2):
        for stream in results[index]:
            assert stream["whole"], (index, stream)
            # It lived through the outage (no line can cross it; a line every 50 ms on either side of it).
            assert stream["longest_pause"] >= outage - 0.5, (index, outage, stream)
        print(f"replica {index}: longest pause {max(s['longest_pause'] for s in results[index])} s")
    print(f"replica 1 (unreachable): {[(s['bytes'], s['end']) for s in results[1]]}")
    for stream in results[1]:
        # Short, and the connection ends with a TCP reset: no client takes it as complete (curl, for one, takes a
        # FIN without close_notify as the end of a read-until-close body).
        assert not stream["whole"] and stream["end"] == "reset", stream
    net.set_endpoints(10262, range(REPLICAS))
    wait_until(lambda: cluster.all_attached(range(REPLICAS)), RETURNED_ATTACHED_S, "every agent on every replica again")
    assert cluster.requests(100)["failures"] == 0
