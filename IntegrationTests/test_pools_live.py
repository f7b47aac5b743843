"""Pools seen live (issue 26, item 3): agents declare their edge pool and report their path at HELLO; the server
shows both in /v1/agents, `edgetunnel status` and a bounded metric; `edgetunnel doctor --pool` checks a pool's path.
With --node-objects the Node's pool label wins over the agent's claim."""
import os
import re

from conftest import BIN, run
from support.harness import Cluster, free_port, http_get, stop_and_check, wait_until
from support.kube import Lab


def pool_metrics(c):
    """`edge_tunnel_server_pool_agents` as {(pool, path): count}."""
    found = {}
    for line in http_get(c.meta_url("/metrics"))[1].splitlines():
        match = re.fullmatch(r'edge_tunnel_server_pool_agents\{pool="([^"]*)",path="([^"]*)"\} (\S+)', line)
        if match:
            found[(match[1], match[2])] = float(match[3])
    return found


def by_name(c):
    return {a["nodeName"]: a for a in c.agents()}


def test_agents_pools_and_paths_show_in_the_list_the_metrics_status_and_doctor(tmp_path):
    c = Cluster(tmp_path)
    try:
        # Reachable at 127.0.0.2 too, which the certificate names: pool b moves there later.
        c.start_server("--bind-address", "0.0.0.0", "--cert-ips", "127.0.0.2")
        tunnel = c.ports["tunnel"]
        # Pool a: --pool, one unmarked loopback address (a lone private address: the private path).
        c.start_agent("edge-a", "--pool", "a", ips=("127.0.0.21",))
        # Pool b: the downward API's variable, and an addresses file that marks its address as the internet.
        addresses = tmp_path / "addresses-b"
        addresses.write_text(f"# pool b\ninternet=127.0.0.1:{tunnel}\n")
        meta_b = free_port()
        c.spawn([BIN / "edge-tunnel-agent", "--node-name", "edge-b", "--node-ip", "127.0.0.22",
                 "--server-addresses-file", addresses, "--pki-dir", tmp_path / "agent-edge-b", "--meta-port", meta_b,
                 "--bootstrap-token", c.token(), "--ca-cert-hash", c.ca_hash],
                "agent-edge-b", env={**os.environ, "EDGE_TUNNEL_POOL": "b"})
        wait_until(lambda: http_get(f"http://127.0.0.1:{meta_b}/readyz")[0] == 200, 20, "edge-b ready")

        agents = by_name(c)
        assert (agents["edge-a"]["pool"], agents["edge-a"]["path"]) == ("a", "private"), agents
        assert (agents["edge-b"]["pool"], agents["edge-b"]["path"]) == ("b", "internet"), agents
        assert pool_metrics(c) == {("a", "private"): 1, ("b", "internet"): 1}
        assert "edge_tunnel_server_agents 2" in http_get(c.meta_url("/metrics"))[1]

        status = run(BIN / "edgetunnel", "status", "--server", c.meta_url("")).stdout
        rows = {line.split()[0]: line.split() for line in status.splitlines()[1:]}
        assert rows["NODE"][:3] == ["NODE", "POOL", "PATH"], status
        assert rows["edge-a"][1:3] == ["a", "private"] and rows["edge-b"][1:3] == ["b", "internet"], status

        def doctor(*args):
            return run(BIN / "edgetunnel", "doctor", "--server", c.meta_url(""), *args, check=False)

        passed = doctor("--pool", "a", "--expect", "private")
        assert passed.returncode == 0, passed
        assert "PASS  pool a: all 1 agent(s) are connected over the private path (edge-a)" in passed.stdout
        assert doctor("--pool", "a=express-connect", "--pool", "b=internet").returncode == 0

        failed = doctor("--pool", "a", "--expect", "internet")
        assert failed.returncode == 1, failed
        assert "FAIL  pool a: 1 of 1 agent(s) are not connected over the internet path: edge-a (private)" in failed.stdout
        missing = doctor("--pool", "z", "--expect", "private", "--output", "json")
        assert missing.returncode == 1 and '"no agent of pool z is connected to server test-server"' in missing.stdout
        usage = doctor("--pool", "a")
        assert usage.returncode == 2 and "--expect" in usage.stderr

        # Pool b moves onto the line: its file now lists only the private address. The agent redials there, and
        # its new HELLO reports the new path.
        addresses.write_text(f"private=127.0.0.2:{tunnel}\n")
        wait_until(lambda: by_name(c)["edge-b"]["path"] == "private", 20, "edge-b on the private path")
        assert by_name(c)["edge-b"]["remoteAddress"].startswith("127.0.0.")
        wait_until(lambda: pool_metrics(c) == {("a", "private"): 1, ("b", "private"): 1, ("b", "internet"): 0}, 10,
                   "the metric to follow")
        assert doctor("--pool", "b", "--expect", "private").returncode == 0
        assert "edge-b (private)" in doctor("--pool", "b", "--expect", "internet").stdout
    finally:
        c.close()


def test_a_bad_pool_is_refused_at_start(tmp_path):
    c = Cluster(tmp_path)
    try:
        for args, env, needle in [(["--pool", "Pool_A"], {}, 'invalid --pool "Pool_A"'),
                                  ([], {"EDGE_TUNNEL_POOL": "-x"}, 'invalid EDGE_TUNNEL_POOL "-x"')]:
            result = run(BIN / "edge-tunnel-agent", "--node-name", "edge-x", "--server-address", "127.0.0.1:1",
                         "--pki-dir", tmp_path / "x", *args, check=False, env={**os.environ, **env})
            assert result.returncode == 1 and needle in result.stderr, result
        result = run(BIN / "edge-tunnel-agent", "--node-name", "edge-x", "--server-address", "line=127.0.0.1:1",
                     "--pki-dir", tmp_path / "x", check=False)
        assert result.returncode == 1 and "private=HOST:PORT or internet=HOST:PORT" in result.stderr, result
        result = run(BIN / "edge-tunnel-server", "--pki-dir", c.pki, "--pool-label", "a/b/c", check=False)
        assert result.returncode == 1 and 'invalid --pool-label "a/b/c"' in result.stderr, result
    finally:
        c.close()


def labelled_node(name, address, labels):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "status": {"addresses": [{"type": "InternalIP", "address": address}]}}


def test_with_node_objects_the_nodes_pool_label_wins_over_the_agents_claim(tmp_path):
    """edge-1's Node is in OpenYurt pool `line`, its agent claims `net`: `line` is shown. edge-2's Node carries
    ACK's node-pool id. The Node moved to another pool is seen at once, with the tunnel kept."""
    lab = Lab(tmp_path)
    try:
        lab.api("POST", "/api/v1/nodes", labelled_node("edge-1", "127.0.0.11", {"apps.openyurt.io/nodepool": "line"}))
        lab.api("POST", "/api/v1/nodes", labelled_node("edge-2", "127.0.0.12", {"alibabacloud.com/nodepool-id": "np0ab12"}))
        server = lab.start_server(0, "--node-objects")
        token = run(BIN / "edgetunnel", "token", "create", "--pki-dir", lab.pki, "--node-cidr", "127.0.0.0/8").stdout.strip()
        ca_hash = run(BIN / "edgetunnel", "pki", "ca-hash", "--pki-dir", lab.pki).stdout.strip()
        for name, claim in (("edge-1", "net"), ("edge-2", None)):
            lab.spawn([BIN / "edge-tunnel-agent", "--node-name", name, "--node-ip", f"127.0.0.1{name[-1]}",
                       "--server-address", f"127.0.0.1:{server.ports['tunnel']}", "--pki-dir", lab.tmp / f"agent-{name}",
                       "--meta-port", free_port(), "--bootstrap-token", token, "--ca-cert-hash", ca_hash,
                       *(["--pool", claim] if claim else [])], f"agent-{name}")

        def agents():
            import json
            return {a["nodeName"]: a for a in json.loads(http_get(server.meta + "/v1/agents")[1])["agents"]}

        wait_until(lambda: len(agents()) == 2, 20, "both agents registered")
        assert agents()["edge-1"]["pool"] == "line" and agents()["edge-2"]["pool"] == "np0ab12"
        server.expect_log("the agent declares pool net, but its Node's pool label says line: the Node's counts")
        since = agents()["edge-1"]["connectedSince"]
        lab.api("PATCH", "/api/v1/nodes/edge-1", {"metadata": {"labels": {"apps.openyurt.io/nodepool": "line-2"}}})
        wait_until(lambda: agents()["edge-1"]["pool"] == "line-2", 10, "the Node's new pool")
        assert agents()["edge-1"]["connectedSince"] == since
    finally:
        stop_and_check(lab.procs)
