"""The fast failover must not flap (issue 26): while data moves, the agent declares its tunnel dead after 1.5 s
without a frame or a TCP ACK (`Keepalive.Active`), so a lost private line is left within 2 s. A line that is merely busy, lossy
or slow must never trip it. Each case runs a bulk transfer over the private line for NO_FLAP_SECONDS (60 by
default; EDGE_TUNNEL_NO_FLAP_SECONDS) and asserts zero failovers: the agent never declared the tunnel dead, never
left the private line, and the server never resumed a tunnel.

This kernel has no netem: rate and queueing delay come from tbf, loss from iptables' `statistic` match, both on
the private line's two ends (network namespaces of netns.Topology).
"""
import os
import subprocess
import time

import pytest

from netns import Topology
from support.harness import wait_until
from support.topology import Setup

PRIVATE, PUBLIC = Topology.PRIVATE, Topology.PUBLIC
NO_FLAP_SECONDS = float(os.environ.get("EDGE_TUNNEL_NO_FLAP_SECONDS") or 60)


@pytest.fixture
def topo():
    with Topology() as t:
        yield t


def shape(topo, rate, latency):
    """tbf on both ends of the private line: `rate`, and a queue that holds `latency` of it."""
    for ns, dev in ((topo.edge, f"pe{topo.tag}"), (topo.cloud, f"pc{topo.tag}")):
        topo.run(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kbit",
                 "latency", latency)


def lose(topo, probability):
    """Random loss both ways on the private line, at the edge's end."""
    dev = f"pe{topo.tag}"
    for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
        topo.run(topo.edge, "iptables", "-w", "-I", chain, direction, dev, "-m", "statistic", "--mode", "random",
                 "--probability", str(probability), "-j", "DROP")


def bulk(s, seconds):
    """A download as fast as the line goes, for `seconds` (curl's --max-time ends it)."""
    return subprocess.Popen(["ip", "netns", "exec", s.topo.cloud,
                             *map(str, s.curl_args(f"/blob/{20 * 1024 * 1024 * 1024}", "-o", "/dev/null",
                                                   max_time=seconds))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("line", ["40mbit-saturated", "5pct-loss", "2mbit-400ms-queue"])
def test_a_busy_lossy_or_slow_private_line_causes_no_failover(topo, tmp_path, line):
    s = Setup(topo, tmp_path)
    try:
        s.start_server([PUBLIC, PRIVATE])
        s.start_agent([f"{PRIVATE}:10262", f"{PUBLIC}:10262"])
        wait_until(lambda: s.path_in_use() == f"{PRIVATE}:10262", 30, "the agent on the private line")
        if line == "40mbit-saturated":
            shape(topo, "40mbit", "50ms")
        elif line == "5pct-loss":
            lose(topo, 0.05)
        else:
            shape(topo, "2mbit", "400ms")
        download = bulk(s, NO_FLAP_SECONDS)
        end = time.monotonic() + NO_FLAP_SECONDS
        checks = 0
        while time.monotonic() < end:
            assert s.path_in_use() == f"{PRIVATE}:10262", f"the agent left the private line ({line})"
            checks += 1
            time.sleep(1)
        download.wait(30)
        log = s.agent.own_text()
        assert "tunnel is dead" not in log, f"a failover on a {line} line: " + \
            "\n".join(l for l in log.splitlines() if "tunnel is dead" in l)
        assert "resumed the agent's" not in s.server.own_text()
        assert checks >= NO_FLAP_SECONDS / 2
        # The transfer really loaded the line: the agent saw data move the whole time (a download that failed at
        # once would prove nothing).
        assert download.returncode == 28, (download.returncode, download.stderr.read().decode()[-300:])
    finally:
        s.close()
