"""Two edge node pools on a real network (issue 26, item 5), in network namespaces (netns.PoolsTopology):

- pool A (express-connect) at site A dials the server's ClusterIP over its private line, with the public address
  as fallback; pool B (internet) at site B dials only the public address, through a masquerading router;
- the server's certificate, the bootstrap tokens and each pool's addresses file come from what
  `edgetunnel manifests --pool ...` renders: its server ConfigMap's certIPs, the token commands it prints (one
  per pool, naming the pool's CIDR) and the ConfigMap `edge-tunnel-pool-NAME` of each pool;
- callers in the cloud reach the nodes of both pools, byte-exact;
- pool B's file is edited to put the line first (as its ConfigMap's comment says): its agent moves onto the line
  with no restart, and a follow stream open across the move loses nothing;
- pool A's line is lost (iptables DROP, or its link down) during a follow stream, a 200 MiB download and a
  200 MiB upload (support.topology.Transfers): the streams resume on the public address, the longest pause of the
  follow stream at most 2 s, every transfer byte-exact, and pool B is not disturbed.

The ClusterIP: the server runs in the cloud namespace, its "pod IP" on lo, and the cloud's nat table holds the
chains kube-proxy makes in iptables mode (KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-* DNAT) rather than a
netns.ClusterNetwork: that topology has no internet path and no second site, and a failover needs both. The
no-flap cases are test_failover_no_flap.py's; one agent's ≤ 2 s pause on the plain topology is test_resume.py's.
"""
import hashlib
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import BIN, run
from edge_service import blob_sha256
from netns import PoolsTopology
from support.harness import PYTHON_HELPER_EXITS, Processes, wait_until
from support.topology import LOOPS, Transfers

HERE = pathlib.Path(__file__).resolve().parent
T = PoolsTopology
LINE = f"{T.CLUSTER_IP}:10262"
PUBLIC = f"{T.PUBLIC}:10262"
EDGE_PORT = 18080
NODES = {"a": "edge-a", "b": "edge-b"}
CIDRS = {site: f"{net}.0/24" for site, net in T.SITES.items()}
# Pool B's follow stream (one line every 50 ms): long enough to be open across the move, which waits for the
# agent's file poll (2 s) and two healthy probes of the line 10 s apart.
B_FOLLOW_LINES = 700


def render_manifests():
    """`edgetunnel manifests` for the two pools: (ConfigMaps as {name: data}, the token commands it printed)."""
    result = run(BIN / "edgetunnel", "manifests", "--pool", f"a=express-connect,cidr={CIDRS['a']}",
                 "--pool", f"b=internet,cidr={CIDRS['b']}", "--line-address", LINE, "--public-address", PUBLIC)
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    configmaps = {doc["metadata"]["name"]: doc["data"] for doc in docs if doc["kind"] == "ConfigMap"}
    return configmaps, result.stderr


def token_commands(stderr):
    """{pool: the arguments of its `edgetunnel token create`} from the commands `manifests` prints, without the
    in-cluster join state (the test's tokens live in its PKI folder)."""
    found = {}
    for line in stderr.splitlines():
        match = re.search(r"edge-tunnel-bootstrap-([a-z0-9-]+) .*edgetunnel token create (.*?)\)\"", line)
        if not match:
            continue
        args = shlex.split(match[2])
        if "--join-state-namespace" in args:
            index = args.index("--join-state-namespace")
            del args[index:index + 2]
        found[match[1]] = args
    return found


class Follow:
    """A chunked `follow` stream from the cloud, each line with its arrival time."""

    def __init__(self, caller, lines):
        self.count = lines
        self.lines = []
        self.proc = subprocess.Popen(["ip", "netns", "exec", caller.topo.cloud,
                                      *map(str, caller.curl_args(f"/follow/{lines}", "-N", max_time=150))],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.append((time.monotonic(), raw.decode().rstrip("\n")))

    def finish(self):
        self.proc.wait(180)
        self.reader.join(10)
        assert self.proc.returncode == 0, f"curl exited {self.proc.returncode}: {self.proc.stderr.read().decode()}"
        assert [line for _, line in self.lines] == [f"line {i}" for i in range(self.count)]

    def longest_pause(self):
        times = [t for t, _ in self.lines]
        return max(b - a for a, b in zip(times, times[1:]))


class Caller:
    """A caller in the cloud of one node (what support.topology.Transfers needs: `topo` and `curl_args`)."""

    def __init__(self, pools, node):
        self.pools, self.node, self.topo = pools, node, pools.topo

    def curl_args(self, path, *extra, max_time=20):
        return self.pools.curl_args(self.node, path, *extra, max_time=max_time)


class Pools(Processes):
    """PKI, the rendered manifests' pieces on the host; the server in `cloud`, an edge service and pool agent at
    each site. The harness's `Processes`: `close` stops every process, last started first, and fails if one of them
    ended badly (see harness.Proc)."""

    def __init__(self, topo, tmp):
        super().__init__(tmp)
        self.topo = topo
        self.pki = self.tmp / "pki"
        self.agents = {}
        run(BIN / "edgetunnel", "pki", "init", "--pki-dir", self.pki)
        run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", self.pki, "--name", "operator")
        self.ca_hash = run(BIN / "edgetunnel", "pki", "ca-hash", "--pki-dir", self.pki).stdout.strip()
        self.configmaps, printed = render_manifests()
        commands = token_commands(printed)
        assert sorted(commands) == ["a", "b"], printed
        self.tokens = {}
        for pool, args in commands.items():
            assert args[args.index("--node-cidr") + 1] == CIDRS[pool], args  # the pool's own CIDR, nothing wider
            self.tokens[pool] = run(BIN / "edgetunnel", "token", "create", "--pki-dir", self.pki,
                                    *args).stdout.strip()
        self.pool_flag = "--pool" in run(BIN / "edge-tunnel-agent", "--help").stdout

    def rendered_addresses(self, pool):
        return self.configmaps[f"edge-tunnel-pool-{pool}"]["server-addresses"]

    def addresses_file(self, pool):
        return self.tmp / f"addresses-{pool}"

    def spawn(self, ns, args, name, clean_exits=(0,)):
        """`args` run in namespace `ns`, logging to `<tmp>/<name>.log`."""
        return super().spawn(["ip", "netns", "exec", ns, *args], name, clean_exits=clean_exits)

    def start_server(self):
        """The server with the certificate names the rendered server ConfigMap gives it (every pool's address)."""
        cert_ips = yaml.safe_load(self.configmaps["edge-tunnel-config"]["server.yaml"])["certIPs"]
        assert sorted(cert_ips) == sorted([T.CLUSTER_IP, T.PUBLIC]), cert_ips
        config = self.tmp / "server.yaml"
        config.write_text(f"certIPs: [{', '.join(cert_ips)}]\n")
        self.server = self.spawn(self.topo.cloud, [BIN / "edge-tunnel-server", "--config", config, "--pki-dir",
                                                   self.pki, "--server-id", "cloud", *LOOPS], "server")
        wait_until(lambda: self.meta("/readyz") == "ok\n", 20, "server ready")

    def start_pool(self, pool):
        """Site `pool`'s edge service, then its agent on the pool's rendered addresses file."""
        edge = self.topo.edges[pool]
        self.spawn(edge, [sys.executable, HERE / "edge_service.py", "127.0.0.1", EDGE_PORT], f"edge-service-{pool}",
                   clean_exits=PYTHON_HELPER_EXITS)
        wait_until(lambda: self.topo.run(edge, "curl", "-s", "--max-time", "2", f"http://127.0.0.1:{EDGE_PORT}/hello",
                                         check=False).returncode == 0, 20, f"site {pool}'s edge service to listen")
        self.addresses_file(pool).write_text(self.rendered_addresses(pool))
        self.agents[pool] = self.spawn(edge, [
            BIN / "edge-tunnel-agent", "--node-name", NODES[pool], "--node-ip", self.topo.node_ip(pool),
            "--server-addresses-file", self.addresses_file(pool), "--pki-dir", self.tmp / f"agent-{pool}",
            "--bootstrap-token", self.tokens[pool], "--ca-cert-hash", self.ca_hash,
            "--allow", f"127.0.0.1:{EDGE_PORT}", *(["--pool", pool] if self.pool_flag else [])], f"agent-{pool}")

    def meta(self, path):
        return self.topo.run(self.topo.cloud, "curl", "-s", "--max-time", "3", f"http://127.0.0.1:10265{path}",
                             check=False).stdout

    def listed(self):
        """The server's /v1/agents as {node name: entry}."""
        return {a["nodeName"]: a for a in json.loads(self.meta("/v1/agents") or "{}").get("agents", [])}

    def seen(self, pool):
        """(pool, path, remote IP) of the pool's agent as the server lists it, or None."""
        entry = self.listed().get(NODES[pool])
        if entry is None:
            return None
        return entry.get("pool"), entry.get("path"), entry["remoteAddress"].rsplit(":", 1)[0]

    def path_in_use(self, pool):
        """The server address the pool's agent is on, from its own /readyz."""
        text = self.topo.run(self.topo.edges[pool], "curl", "-s", "--max-time", "3", "http://127.0.0.1:10266/readyz",
                             check=False).stdout
        return text.rsplit(" ", 1)[-1].strip() if text.startswith("ok") else None

    def curl_args(self, node, path, *extra, max_time=20):
        return ["curl", "-sS", "--max-time", str(max_time), "--proxy-cacert", self.pki / "ca.crt", "--proxy-cert",
                self.pki / "operator.crt", "--proxy-key", self.pki / "operator.key", "-p", "-x",
                "https://127.0.0.1:10263", *extra, f"http://{node}:{EDGE_PORT}{path}"]

    def call(self, pool, path, *extra, max_time=20, text=True):
        return subprocess.run(["ip", "netns", "exec", self.topo.cloud,
                               *map(str, self.curl_args(NODES[pool], path, *extra, max_time=max_time))],
                              capture_output=True, text=text, timeout=max_time + 10)

    def assert_hello(self, pool):
        answer = self.call(pool, "/hello")
        assert answer.stdout == "hello from the edge\n", f"{NODES[pool]}: curl: {answer.stderr.strip()!r}"

    def assert_byte_exact(self, pool, size=8 * 1024 * 1024):
        """A download and an upload of `size` bytes through the pool's node, byte-exact."""
        download = self.call(pool, f"/blob/{size}", text=False)
        assert download.returncode == 0, download.stderr
        assert hashlib.sha256(download.stdout).hexdigest() == blob_sha256(size), f"{NODES[pool]}: download differs"
        body = self.tmp / f"upload-{pool}.bin"
        body.write_bytes(os.urandom(size))
        upload = self.call(pool, "/sha256", "--data-binary", f"@{body}", "-H", "Content-Type: application/octet-stream")
        assert upload.stdout.strip() == hashlib.sha256(body.read_bytes()).hexdigest(), upload.stderr

    def dnat_connections(self):
        """Connections the ClusterIP's endpoint rule (KUBE-SEP-POD) has sent to the server pod: its packet counter,
        which the nat table bumps once per connection."""
        listing = self.topo.run(self.topo.cloud, "iptables", "-w", "-t", "nat", "-L", "KUBE-SEP-POD", "-v", "-x",
                                "-n").stdout
        return sum(int(line.split()[0]) for line in listing.splitlines()[2:] if "DNAT" in line)

    def line_reachable_from(self, site):
        """Whether a TCP connection to the ClusterIP's tunnel port opens from `site` (curl's TLS attempt without a
        client certificate fails later; 7 is "could not connect", 28 a timeout)."""
        return self.topo.run(self.topo.edges[site], "curl", "-sk", "--max-time", "2", "-o", "/dev/null",
                             f"https://{LINE}/", check=False).returncode not in (7, 28)

    def doctor(self, *args):
        return self.topo.run(self.topo.cloud, BIN / "edgetunnel", "doctor", "--server", "http://127.0.0.1:10265", *args,
                             check=False)


@pytest.fixture
def pools(tmp_path):
    """Both pools up: A on the line (ClusterIP), B on the public address; checked from both ends."""
    with PoolsTopology() as topo:
        p = Pools(topo, tmp_path)
        try:
            # The rendered files: A's line first and the public address as its fallback; B's the public one only.
            assert [l for l in p.rendered_addresses("a").splitlines() if not l.startswith("#")] == [LINE, PUBLIC]
            assert [l for l in p.rendered_addresses("b").splitlines() if not l.startswith("#")] == [PUBLIC]
            p.start_server()
            p.start_pool("a")
            p.start_pool("b")
            wait_until(lambda: p.path_in_use("a") == LINE and p.path_in_use("b") == PUBLIC, 30,
                       "pool A's agent on the line and pool B's on the public address")
            wait_until(lambda: p.seen("a") == ("a", "private", topo.node_ip("a")), 10,
                       "edge-a listed in pool a, over the line, from its line address")
            wait_until(lambda: p.seen("b") == ("b", "internet", T.MASQUERADED), 10,
                       "edge-b listed in pool b, over the internet, masqueraded")
            # Pool A came in through the ClusterIP's DNAT; site B cannot reach the ClusterIP at all.
            assert p.dnat_connections() >= 2, "pool A's join and tunnel did not pass the ClusterIP's DNAT"
            assert not p.line_reachable_from("b"), "site B reaches the ClusterIP before it has a line"
            yield p
        finally:
            p.close()


def test_callers_reach_both_pools_and_pool_b_moves_onto_the_line_without_a_restart(pools):
    p, topo = pools, pools.topo
    for pool in ("a", "b"):
        p.assert_hello(pool)
        p.assert_byte_exact(pool)
    checked = p.doctor("--pool", "a=express-connect", "--pool", "b=internet")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    pid, a_since = p.agents["b"].popen.pid, p.listed()[NODES["a"]]["connectedSince"]
    follow = Follow(Caller(p, NODES["b"]), B_FOLLOW_LINES)
    wait_until(lambda: len(follow.lines) >= 20, 20, "pool B's follow stream to run")

    # Site B gets its line, and the operator makes the one edit the ConfigMap's comment names: the line first.
    topo.provision_line_b()
    assert p.line_reachable_from("b"), "site B's new line does not reach the ClusterIP"
    rendered = p.rendered_addresses("b").splitlines()
    first = next(i for i, line in enumerate(rendered) if not line.startswith("#"))
    p.addresses_file("b").write_text("\n".join([*rendered[:first], LINE, *rendered[first:]]) + "\n")
    edited = time.monotonic()
    wait_until(lambda: p.path_in_use("b") == LINE, 40, "pool B's agent on the line")
    moved = time.monotonic() - edited
    wait_until(lambda: p.seen("b") == ("b", "private", f"{T.SITES['b']}.2"), 10,
               "edge-b listed over the line, from its line address")
    assert follow.proc.poll() is None, "the follow stream should still be open across the move"
    assert p.agents["b"].alive() and p.agents["b"].popen.pid == pid, "pool B's agent was restarted"
    p.agents["b"].expect_log(f"server addresses are now {LINE}, {PUBLIC}")
    p.agents["b"].expect_log(f"preferred server {LINE} is healthy again: moved from {PUBLIC}")
    p.assert_hello("b")
    checked = p.doctor("--pool", "a=express-connect", "--pool", "b=express-connect")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    follow.finish()
    # Pool A was not disturbed: the same tunnel, still on its line.
    assert p.listed()[NODES["a"]]["connectedSince"] == a_since and p.path_in_use("a") == LINE
    print(f"pool B on the line {moved:.1f} s after its file changed; its follow stream's longest pause "
          f"{follow.longest_pause():.2f} s")


@pytest.mark.parametrize("cut", ["drop", "link-down"])
def test_pool_a_streams_resume_on_the_public_address_within_2_s_of_losing_the_line(pools, tmp_path, cut):
    p, topo = pools, pools.topo
    b_since = p.listed()[NODES["b"]]["connectedSince"]
    t = Transfers(Caller(p, NODES["a"]), tmp_path)
    t.start()
    if cut == "drop":
        topo.drop_line("a", True)
    else:
        topo.cut_line("a")
    lost = time.monotonic()
    wait_until(lambda: p.path_in_use("a") == PUBLIC, 40, "pool A's agent on the public address")
    moved = time.monotonic() - lost
    assert all(t.running()), "every transfer pauses across the failover, none ends"
    wait_until(lambda: p.seen("a") == ("a", "internet", T.MASQUERADED), 10, "edge-a listed over the internet")
    p.assert_hello("b")  # pool B carries on meanwhile
    results = t.finish()
    t.assert_complete(results)
    p.server.expect_log("resumed the agent's 3 streams on its new connection")
    pause = t.longest_pause()
    print(f"pool A's line lost ({cut}): on the public address {moved:.2f} s after; longest pause of the follow "
          f"stream {pause:.2f} s")
    assert pause <= 2.0, f"the follow stream paused {pause:.2f} s across pool A's failover"
    # Pool B's tunnel is the one it had before: the failover was pool A's alone.
    assert p.listed()[NODES["b"]]["connectedSince"] == b_since and p.path_in_use("b") == PUBLIC
    p.assert_hello("a")
