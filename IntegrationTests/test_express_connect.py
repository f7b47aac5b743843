"""Express Connect without manual steps, on a real network: namespaces for the cloud, the edge and an internet
router that masquerades the edge, a private line between cloud and edge, links cut on purpose."""
import hashlib
import json
import pathlib
import shutil
import subprocess
import threading
import time

import pytest

from conftest import BIN, run
from edge_service import blob_sha256
from netns import Topology
from support.harness import wait_until
from support.topology import Setup

PRIVATE, PUBLIC = Topology.PRIVATE, Topology.PUBLIC


@pytest.fixture
def topo():
    with Topology() as t:
        yield t


def test_the_documents_switch_automated(topo, tmp_path):
    """Server certificate names only the public address; the agent prefers the private line. Adding the private
    address to the server config moves the agent onto the private line with no restart, and a stream that was
    open across the change survives."""
    s = Setup(topo, tmp_path)
    try:
        s.start_server([PUBLIC])
        s.start_agent([f"{PRIVATE}:10262", f"{PUBLIC}:10262"])
        wait_until(lambda: s.path_in_use() == f"{PUBLIC}:10262", 30, "the agent on the internet path")
        assert s.remote_of_agent().startswith("10.240.3.2:")  # masqueraded: the cloud never sees the edge
        # TLS verification fails on the private IP, and the log says why.
        s.agent.expect_log("skipping server 10.240.1.1:10262: its certificate does not name 10.240.1.1:10262")
        metrics = s.agent_meta("/metrics")
        assert f'edge_tunnel_agent_active_server{{address="{PUBLIC}:10262"}} 1' in metrics
        assert f'edge_tunnel_agent_active_server{{address="{PRIVATE}:10262"}} 0' in metrics

        # Long enough (about 40 s at 100 KiB/s) to still be running when the agent moves.
        size = 4 * 1024 * 1024
        slow = subprocess.Popen(["ip", "netns", "exec", topo.cloud,
                                 *map(str, s.curl_args(f"/blob/{size}", "--limit-rate", "100K", max_time=120))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1)

        server_pid = s.server.popen.pid
        s.config.write_text(f"certIPs: [{PUBLIC}, {PRIVATE}]\n")  # the operator's only step
        wait_until(lambda: s.path_in_use() == f"{PRIVATE}:10262", 45, "the agent on the private line")
        assert s.remote_of_agent().startswith("10.240.1.2:")
        assert s.server.popen.pid == server_pid and s.server.alive()
        s.assert_hello()

        assert slow.poll() is None, "the stream should still be running across the switch"
        out, err = slow.communicate(timeout=120)
        assert slow.returncode == 0, err
        assert hashlib.sha256(out).hexdigest() == blob_sha256(size)
    finally:
        s.close()


def test_failover_to_the_internet_and_back(topo, tmp_path):
    s = Setup(topo, tmp_path)
    try:
        s.start_server([PUBLIC, PRIVATE])
        s.start_agent([f"{PRIVATE}:10262", f"{PUBLIC}:10262"])
        wait_until(lambda: s.path_in_use() == f"{PRIVATE}:10262", 30, "the agent on the private line")
        transfer = subprocess.Popen(["ip", "netns", "exec", topo.cloud, *map(str, s.curl_args("/infinite"))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)

        topo.cut_private_line()
        cut = time.monotonic()
        # New requests every 0.5 s, each on its own: those sent before the agent moved may wait for the server's
        # dial timeout on the dead tunnel; the first success must come within 15 s of the cut.
        successes = []

        def attempt():
            if s.request().stdout == "hello from the edge\n":
                successes.append(time.monotonic() - cut)

        launched = []
        while time.monotonic() - cut < 20 and not successes:
            thread = threading.Thread(target=attempt)
            thread.start()
            launched.append(thread)
            time.sleep(0.5)
        for thread in launched:
            thread.join(30)
        assert successes, "no request succeeded over the internet path"
        assert min(successes) < 15, f"the first request to succeed finished {min(successes):.1f}s after the cut"
        assert s.path_in_use() == f"{PUBLIC}:10262"
        transfer.kill()

        topo.restore_private_line()
        restored = time.monotonic()
        failures = []
        stop = threading.Event()

        def keep_requesting():
            while not stop.is_set():
                result = s.request()
                if result.stdout != "hello from the edge\n":
                    failures.append((round(time.monotonic() - restored, 1), result.stderr.strip()))
                time.sleep(0.3)

        worker = threading.Thread(target=keep_requesting)
        worker.start()
        try:
            wait_until(lambda: s.path_in_use() == f"{PRIVATE}:10262", 30, "the agent back on the private line")
            assert time.monotonic() - restored < 30
            time.sleep(3)
        finally:
            stop.set()
            worker.join(30)
        assert not failures, f"requests failed after recovery: {failures}"
        assert s.remote_of_agent().startswith("10.240.1.2:")
    finally:
        s.close()


def test_bad_paths_are_skipped_with_a_reason(topo, tmp_path):
    """A refusing address, a black-holed one and one with the wrong certificate are each skipped with a logged
    reason; the agent ends up on the working one."""
    s = Setup(topo, tmp_path)
    try:
        s.start_server([PUBLIC, PRIVATE])
        # A server of another CA on the private line's port 10272.
        other = tmp_path / "other"
        run(BIN / "edgetunnel", "pki", "init", "--pki-dir", other)
        s.spawn(topo.cloud, [BIN / "edge-tunnel-server", "--pki-dir", other, "--tunnel-port", "10272",
                             "--secure-port", "10273", "--meta-port", "10275", "--insecure-port", "0", "--cert-ips", PRIVATE],
                "impostor")
        topo.run(topo.cloud, "iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", "10270", "-j", "DROP")
        s.start_agent([f"{PRIVATE}:10271", f"{PRIVATE}:10270", f"{PRIVATE}:10272", f"{PUBLIC}:10262"])
        wait_until(lambda: s.path_in_use() == f"{PUBLIC}:10262", 40, "the agent on the working address")
        log = s.agent.text()
        assert f"skipping server {PRIVATE}:10271" in log and "refused" in log.lower()
        assert f"skipping server {PRIVATE}:10270" in log
        assert f"skipping server {PRIVATE}:10272" in log
        s.assert_hello()
    finally:
        s.close()


def test_a_changed_addresses_file_moves_the_agent_without_a_restart(topo, tmp_path):
    s = Setup(topo, tmp_path)
    try:
        s.start_server([PUBLIC, PRIVATE])
        s.start_agent([f"{PUBLIC}:10262"])
        wait_until(lambda: s.path_in_use() == f"{PUBLIC}:10262", 30, "the agent on the internet path")
        pid = s.agent.popen.pid
        s.addresses.write_text(f"# private line first\n{PRIVATE}:10262\n{PUBLIC}:10262\n")
        wait_until(lambda: s.path_in_use() == f"{PRIVATE}:10262", 40, "the agent on the private line")
        s.addresses.write_text(f"{PUBLIC}:10262\n")
        wait_until(lambda: s.path_in_use() == f"{PUBLIC}:10262", 20, "the agent back on the internet path")
        s.addresses.write_text("not an address\n")
        wait_until(lambda: "keeping the current server addresses" in s.agent.text(), 10, "the bad file to be refused")
        assert s.path_in_use() == f"{PUBLIC}:10262" and s.agent.popen.pid == pid
    finally:
        s.close()


def test_a_server_name_follows_its_dns_record(topo, tmp_path):
    """Agents usually name the server (a load balancer's or a private zone's DNS name) rather than an IP. The
    name is resolved on every dial and checked against the certificate: when the record moves from the private
    line to the public address, the agent follows it on its next dial, with no restart."""
    name = "tunnel.edge.test"
    s = Setup(topo, tmp_path)
    # `ip netns exec` bind-mounts /etc/netns/NS/hosts over /etc/hosts for the agent only; rewritten in place
    # (same inode) it changes what the agent's resolver reads on its next lookup.
    netns_etc = pathlib.Path("/etc/netns") / topo.edge
    hosts = netns_etc / "hosts"
    try:
        netns_etc.mkdir(parents=True)
        hosts.write_text(f"127.0.0.1 localhost\n{PRIVATE} {name}\n")
        s.start_server([])
        s.config.write_text(f"certDNSNames: [{name}]\n")  # the certificate names only the DNS name
        wait_until(lambda: name in json.loads(s.meta("/v1/server") or "{}").get("certificateDNSNames", []), 15,
                   "the certificate to name the server's DNS name")
        s.start_agent([f"{name}:10262"])
        wait_until(lambda: s.path_in_use() == f"{name}:10262", 30, "the agent connected by name")
        assert s.remote_of_agent().startswith("10.240.1.2:")  # over the private line
        s.assert_hello()

        with open(hosts, "r+") as f:  # in place: the bind mount follows the inode
            f.truncate(0)
            f.write(f"127.0.0.1 localhost\n{PUBLIC} {name}\n")
        topo.cut_private_line()
        wait_until(lambda: (s.remote_of_agent() or "").startswith("10.240.3.2:"), 40,
                   "the agent on the address the name now has (masqueraded by the internet router)")
        assert s.path_in_use() == f"{name}:10262"
        s.assert_hello()
    finally:
        try:
            s.close()
        finally:
            shutil.rmtree(netns_etc, ignore_errors=True)


def test_failover_with_two_replicas_moves_every_tunnel_and_back(topo, tmp_path):
    """Two server replicas in the cloud behind both of its addresses, each connection sent to one of them at
    random as a Service does (DNAT in the cloud's PREROUTING). The agent holds a tunnel to each over the private
    line. With the line cut, both tunnels move to the internet path and callers on either replica reach the node;
    restored, both come back to the private line."""
    s = Setup(topo, tmp_path)
    replicas = {1: 20000, 2: 30000}
    try:
        for address in (PRIVATE, PUBLIC):
            for index, base in replicas.items():
                rule = ["-m", "statistic", "--mode", "random", "--probability", "0.5"] if index == 1 else []
                topo.run(topo.cloud, "iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-d", address, "-p", "tcp",
                         "--dport", "10262", *rule, "-j", "DNAT", "--to-destination", f"{address}:{base + 262}")
        for index, base in replicas.items():
            config = s.tmp / f"server-{index}.yaml"
            config.write_text(f"certIPs: [{PUBLIC}, {PRIVATE}]\n")
            s.spawn(topo.cloud, [BIN / "edge-tunnel-server", "--config", config, "--pki-dir", s.pki, "--ca-dir", s.pki,
                                 "--state-dir", s.tmp / f"state-{index}", "--server-id", f"r{index}", "--server-count", "2",
                                 "--tunnel-port", base + 262, "--secure-port", base + 263, "--insecure-port", base + 264,
                                 "--meta-port", base + 265], f"server-{index}")

        def remotes():
            """{replica: the remote address edge-1's tunnel comes from, or None}."""
            found = {}
            for index, base in replicas.items():
                text = topo.run(topo.cloud, "curl", "-s", "--max-time", "3", f"http://127.0.0.1:{base + 265}/v1/agents",
                                check=False).stdout
                agents = json.loads(text or "{}").get("agents", [])
                found[index] = next((a["remoteAddress"].split(":")[0] for a in agents if a["nodeName"] == "edge-1"), None)
            return found

        def reach_through_each():
            for base in replicas.values():
                args = [a if a != "https://127.0.0.1:10263" else f"https://127.0.0.1:{base + 263}" for a in s.curl_args("/hello")]
                result = topo.run(topo.cloud, *args, check=False)
                assert result.stdout == "hello from the edge\n", (base, result.stderr)

        wait_until(lambda: all(s.meta_of(base + 265) for base in replicas.values()), 20, "both replicas up")
        s.start_agent([f"{PRIVATE}:10262", f"{PUBLIC}:10262"])
        wait_until(lambda: remotes() == {1: "10.240.1.2", 2: "10.240.1.2"}, 60, "a tunnel to each replica on the private line")
        reach_through_each()

        topo.cut_private_line()
        cut = time.monotonic()
        wait_until(lambda: remotes() == {1: "10.240.3.2", 2: "10.240.3.2"}, 60, "both tunnels on the internet path")
        moved = time.monotonic() - cut
        reach_through_each()

        topo.restore_private_line()
        restored = time.monotonic()
        wait_until(lambda: remotes() == {1: "10.240.1.2", 2: "10.240.1.2"}, 60, "both tunnels back on the private line")
        print(f"both tunnels on the internet {moved:.1f} s after the cut, back {time.monotonic() - restored:.1f} s "
              "after the line returned")
        reach_through_each()
    finally:
        s.close()
