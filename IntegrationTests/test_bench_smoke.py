"""The benchmark suite in its quick form: every contender runs and produces numbers. Timings are not judged."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import BIN, ROOT, assert_one_line_error, run

CONTENDERS = ["direct", "socat", "ssh -R", "ssh -R tuned", "EdgeTunnel (forward → TLS CONNECT)",
              "EdgeTunnel (forward → Unix socket CONNECT)", "EdgeTunnel (forward → gRPC socket)",
              "EdgeTunnel (Host-routed HTTP port)"]
# iperf3 is not HTTP, so it cannot be routed by Host.
HTTP_ONLY = {"EdgeTunnel (Host-routed HTTP port)"}


def test_every_contender_produces_numbers(tmp_path):
    result = subprocess.run([sys.executable, ROOT / "scripts" / "bench", "--quick", "--bin-dir", BIN,
                             "--output", tmp_path / "out", "--work-dir", tmp_path / "work"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert list(data["results"]) == CONTENDERS
    for name, figures in data["results"].items():
        # Every contender carried traffic and every figure was measured; how fast is not judged here (a
        # 2-second run of a slow relay may complete no 1 MiB request at all).
        for key in ["iperf3_1_stream_gbit_s", "iperf3_8_streams_gbit_s"]:
            if name in HTTP_ONLY:
                assert figures[key] is None, (name, key)
            else:
                assert figures[key]["median"] > 0, (name, key, "no bytes moved")
        assert figures["wrk_1k_rps"]["median"] > 0, (name, "no 1 KiB request completed")
        for key in ["wrk_1k_rps", "wrk_1m_rps", "wrk_1k_p99_ms", "wrk_1m_p99_ms"]:
            assert isinstance(figures[key]["median"], (int, float)), (name, key)
            assert len(figures[key]["runs"]) == 1, (name, key)
        # The relays' CPU per request was measured for every relaying contender (sshd's forks and socat's
        # reaped children included), and there is nothing to measure for direct.
        if name == "direct":
            assert figures["wrk_1k_relay_cpu_us"] is None
            assert figures["iperf3_1_stream_relay_cpu_s_per_gb"] is None
        else:
            assert figures["wrk_1k_relay_cpu_us"]["median"] > 0, (name, "no relay CPU counted")
            if name not in HTTP_ONLY:
                assert figures["iperf3_1_stream_relay_cpu_s_per_gb"]["median"] > 0, (name, "no relay CPU per GB")
        # The responses were the files, not errors.
        assert not any("Non-2xx" in error for error in figures["errors"]), (name, figures["errors"])
    # Stream set-up: every stream of the short run opened, on both paths.
    for path in ("uds", "tls"):
        assert data["setup"][path]["streams_per_second"]["median"] > 0, path
        assert data["setup"][path]["failures"]["median"] == 0, path
    # Footprint: the processes were found and measured; idle streams were held (RSS can only be read, not judged).
    footprint = data["footprint"]
    assert footprint["idle_agent_mib"]["median"] > 0 and footprint["idle_server_mib"]["median"] > 0
    assert footprint["server_cpu_s_per_gb"]["median"] > 0 and footprint["agent_cpu_s_per_gb"]["median"] > 0
    # Swarm: all agents connected, and all came back after the server restarted.
    swarm = data["swarm"]["50"]
    assert swarm["connect_s"]["median"] > 0 and swarm["reconnect_s"]["median"] > 0
    assert swarm["server_rss_mib"]["median"] > 0
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "EdgeTunnel (forward → TLS CONNECT)" in table and "× ssh -R tuned" in table
    assert "| EdgeTunnel (Host-routed HTTP port) | — | — |" in table and "relay CPU µs per 1 KiB req" in table
    assert "relay CPU s per GB" in table
    assert "new streams/s" in table and "KiB per agent" in table and "idle agent RSS" in table


def test_bench_commands_reject_bad_input_in_one_line(tmp_path):
    pki = tmp_path / "pki"
    run(BIN / "edgetunnel", "pki", "init", "--pki-dir", pki)
    streams = [BIN / "edgetunnel", "bench", "streams"]
    for args, needles in [
        (["--server", "unix:/nonexistent.sock", "--to", "edge-1:80", "--count", "0"], ["--count", "0"]),
        (["--server", "unix:/nonexistent.sock", "--to", "edge-1:80", "--concurrency", "0"], ["--concurrency"]),
        (["--server", "nowhere", "--to", "edge-1:80"], ["--server", "nowhere"]),
        (["--server", "unix:/nonexistent.sock", "--to", "edge-1"], ["--to", "edge-1"]),
        (["--server", "127.0.0.1:10263", "--to", "edge-1:80"], ["--ca-file"]),
    ]:
        assert_one_line_error(run(*streams, *args, check=False), *needles)
    swarm = [BIN / "edgetunnel", "bench", "swarm"]
    for args, needles in [
        (["--server", "127.0.0.1:10262", "--pki-dir", pki, "--agents", "0"], ["--agents", "0"]),
        (["--server", "127.0.0.1:10262", "--pki-dir", tmp_path / "missing"], [str(tmp_path / "missing")]),
        (["--server", "not an address", "--pki-dir", pki, "--agents", "1"], ["not an address"]),
        (["--server", "127.0.0.1:10262", "--pki-dir", pki, "--threads", "0"], ["--threads", "0"]),
        (["--server", "127.0.0.1:10262", "--pki-dir", pki, "--interval", "0"], ["--interval", "0"]),
    ]:
        assert_one_line_error(run(*swarm, *args, check=False), *needles)


def test_the_shaped_link_scenario_measures_every_path(tmp_path):
    """`scripts/bench --shaped` in its shortest form: two namespaces joined by a tbf-shaped veth pair, EdgeTunnel and
    ssh -R under the same shaping, idle and under one bulk download. Every path carried its bulk download and timed
    its small requests; how fast is not judged here (docs/benchmarks.md reports the long runs). Under the download
    the agent's metrics show its tunnel paced."""
    from netns import require_netns
    require_netns()
    result = subprocess.run([sys.executable, ROOT / "scripts" / "bench", "--shaped", "--runs", "1", "--samples", "5",
                             "--bin-dir", BIN, "--output", tmp_path / "out", "--work-dir", tmp_path / "work"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "shaped.json").read_text())
    assert len(data) == 5 and any(row.startswith("EdgeTunnel") for row in data) and any("ssh -R" in r for r in data)
    for row, modes in data.items():
        assert modes["idle"][0]["samples"] == 5 and modes["bulk"][0]["samples"] == 5, row
        # The link is 40 Mbit/s: a bulk download that moved far less did not share it with the requests.
        assert 20 < modes["bulk"][0]["bulk_mbit_s"] < 45, (row, modes["bulk"][0])
        if row.startswith("EdgeTunnel"):
            # The agent judged its link slow and says so (its metric).
            assert modes["bulk"][0]["agent_paced_tunnels"] == 1, (row, modes["bulk"][0])
    assert "| EdgeTunnel, one keep-alive CONNECT stream |" in result.stdout


def test_a_restarted_replica_is_refilled_jittered_with_no_handshake_wasted(tmp_path):
    """`scripts/bench --replica-swarm` with 500 swarm agents (real agent code, a certificate each, a source address
    each) against three replicas behind an iptables-balanced address, as kube-proxy balances a ClusterIP. What a
    rolling restart relies on: every agent registers one tunnel per replica and no TLS handshake is spent on a
    duplicate (the replica probe turns held replicas away before TLS); the restarted replica gets every agent back
    while the other two keep theirs; and the agents come back jittered, not in step. Every agent loses the replica
    in the same instant; redials in step would land as a burst: with the redial spread and the probe pace's jitter
    taken out of ReplicaTunnels the busiest second held 40% of the agents, with them 22% (uniform over the 5-s
    spread is 20%)."""
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        pytest.skip("needs root and iptables (the Service address is an iptables DNAT chain)")
    agents = 500
    try:
        result = subprocess.run([sys.executable, ROOT / "scripts" / "bench", "--replica-swarm", str(agents),
                                 "--bin-dir", BIN, "--work-dir", tmp_path],
                                capture_output=True, text=True, timeout=300)
    finally:
        # A bench killed by the timeout never ran its own clean-up: its servers and swarms (sessions and process
        # groups of their own, all started from the work folder) and the Service chain would outlive the test.
        subprocess.run(["pkill", "-KILL", "-f", str(tmp_path)], check=False)
        chain = ["iptables", "-t", "nat"]
        rule = ["OUTPUT", "-d", "127.0.0.100", "-p", "tcp", "--dport", "10262", "-j", "EDGETUNNEL-BENCH"]
        while subprocess.run([*chain, "-D", *rule], capture_output=True).returncode == 0:
            pass
        subprocess.run([*chain, "-F", "EDGETUNNEL-BENCH"], capture_output=True)
        subprocess.run([*chain, "-X", "EDGETUNNEL-BENCH"], capture_output=True)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert data["all_replicas_held_s"] is not None, data
    fill = data["first_fill_per_agent"]
    # three tunnels an agent and at most 2% more (tunnels that missed their keepalives on a loaded machine and were
    # dialled again); none refused as a duplicate after its handshake
    assert 3.0 <= fill["registered"] <= 3.06 and fill["duplicates"] == 0, fill
    assert fill["probes"] >= 3, fill  # the probes were answered and counted
    assert data["restarted_replica_held_again_s"] is not None, data
    assert data["lowest_count_on_other_replicas"] >= agents * 0.98, data
    assert 1.0 <= data["refill_per_agent"]["returned_replica"]["registered"] <= 1.02, data["refill_per_agent"]
    arrivals = data["refill_arrivals"]
    assert arrivals["total"] >= agents, arrivals
    assert arrivals["busiest_second_share"] < 0.3, arrivals
