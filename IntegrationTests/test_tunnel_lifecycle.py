"""The processes over their life: agents back after a server restart, an agent draining on SIGTERM, a dead server
detected, a certificate renewed over the tunnel, the meta endpoints and `edgetunnel status`, the server's config file
and flags, JSON logs, and `edgetunnel demo`."""
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import time

from conftest import BIN, assert_one_line_error, run
from edge_service import blob_sha256
from support.harness import Cluster, Proc, free_port, http_get, wait_until
from support.tunnel import cluster, edge  # noqa: F401  (fixtures)


def test_agents_come_back_after_a_server_restart(cluster, edge):
    assert cluster.server.stop() == 0
    wait_until(lambda: http_get(f"http://127.0.0.1:{cluster.agent.meta}/readyz")[0] == 503, 20, "agent to notice")
    cluster.start_server()
    wait_until(lambda: http_get(f"http://127.0.0.1:{cluster.agent.meta}/readyz")[0] == 200, 40, "agent to return")
    assert cluster.curl(f"http://edge-1:{edge}/hello", check=True).stdout == "hello from the edge\n"
    assert "reusing serving certificate" in cluster.server.text()


def test_agent_drains_on_sigterm(cluster, edge):
    """The agent's GOAWAY drain lets an 8 s download finish: past the server's 5 s check for agents that never
    registered, which used to cut a draining agent's streams short."""
    size = 8 * 1024 * 1024
    slow = subprocess.Popen(
        ["curl", "-sS", "--limit-rate", "1M", "--proxy-cacert", cluster.ca, "--proxy-cert", cluster.cert,
         "--proxy-key", cluster.key, "-p", "-x", f"https://127.0.0.1:{cluster.ports['secure']}",
         f"http://edge-1:{edge}/blob/{size}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(lambda: cluster.agents()[0]["streams"] == 1, 10, "the stream to open")
    cluster.agent.send_signal(signal.SIGTERM)
    out, err = slow.communicate(timeout=30)
    assert slow.returncode == 0, err
    assert hashlib.sha256(out).hexdigest() == blob_sha256(size)
    assert cluster.agent.popen.wait(20) == 0
    wait_until(lambda: cluster.agents() == [], 10, "the agent to be gone")
    status, sock = cluster.connect_stream(f"edge-1:{edge}")
    assert status == "HTTP/1.1 502 Bad Gateway"


def test_meta_endpoints_and_status(cluster, edge):
    cluster.curl(f"http://edge-1:{edge}/blob/100000", "-o", "/dev/null", check=True)
    wait_until(lambda: cluster.agents()[0]["streams"] == 0, 5, "the finished stream to be closed")
    agents = cluster.agents()
    assert len(agents) == 1
    agent = agents[0]
    assert agent["nodeName"] == "edge-1" and agent["nodeIPs"] == ["127.0.0.1"]
    assert agent["bytesFromAgent"] >= 100000 and agent["streams"] == 0
    assert agent["remoteAddress"].startswith("127.0.0.1:")
    metrics = http_get(cluster.meta_url("/metrics"))[1]
    for name in ["edge_tunnel_server_agents 1", "edge_tunnel_server_streams", "edge_tunnel_server_dial_duration_seconds_bucket",
                 'edge_tunnel_server_bytes_total{direction="from_agent"}',
                 "edge_tunnel_server_certificate_expiry_timestamp_seconds"]:
        assert name in metrics, name
    agent_metrics = http_get(f"http://127.0.0.1:{cluster.agent.meta}/metrics")[1]
    assert "edge_tunnel_agent_connected 1" in agent_metrics
    assert f'edge_tunnel_agent_active_server{{address="127.0.0.1:{cluster.ports["tunnel"]}"}} 1' in agent_metrics
    assert http_get(f"http://127.0.0.1:{cluster.agent.meta}/readyz")[1].startswith("ok: tunnel up via")

    status = run(BIN / "edgetunnel", "status", "--server", f"http://127.0.0.1:{cluster.ports['meta']}").stdout
    assert "edge-1" in status and "127.0.0.1" in status and "1 agent(s)" in status
    unreachable = run(BIN / "edgetunnel", "status", "--server", f"http://127.0.0.1:{free_port()}", check=False)
    assert_one_line_error(unreachable, "cannot reach")


def event_loop_threads(pid):
    """The number of SwiftNIO event-loop threads (named NIO-ELT-…) the process runs."""
    return sum(1 for comm in pathlib.Path(f"/proc/{pid}/task").glob("*/comm") if comm.read_text().startswith("NIO-ELT"))


def test_server_config_file_and_flags(tmp_path):
    c = Cluster(tmp_path)
    try:
        config = tmp_path / "server.yaml"
        config.write_text("certIPs: [192.0.2.7]\ncertDNSNames: [tunnel.example.com]\nlogLevel: debug\n"
                          "eventLoopThreads: 3\n")
        c.start_server("--config", config)
        sans = run("openssl", "x509", "-in", c.pki / "server.crt", "-noout", "-ext", "subjectAltName").stdout
        assert "192.0.2.7" in sans and "tunnel.example.com" in sans
        assert event_loop_threads(c.server.popen.pid) == 3
        c.server.stop()
        # A flag wins over the file.
        c.start_server("--config", config, "--cert-ips", "198.51.100.9", "--event-loop-threads", "1")
        sans = run("openssl", "x509", "-in", c.pki / "server.crt", "-noout", "-ext", "subjectAltName").stdout
        assert "198.51.100.9" in sans and "192.0.2.7" not in sans
        assert event_loop_threads(c.server.popen.pid) == 1
        c.server.stop()
    finally:
        c.close()
    server = [BIN / "edge-tunnel-server", "--pki-dir", c.pki, "--meta-port", free_port(),
              "--tunnel-port", free_port(), "--secure-port", free_port(), "--insecure-port", "0"]
    config.write_text("certIPs: [192.0.2.7\n")
    assert_one_line_error(run(*server, "--config", config, check=False), "server.yaml", "not valid YAML")
    config.write_text("certIps: [192.0.2.7]\n")
    assert_one_line_error(run(*server, "--config", config, check=False), "unknown setting \"certIps\"")
    config.write_text("tunnelPort: ten\n")
    assert_one_line_error(run(*server, "--config", config, check=False), "tunnelPort")
    assert_one_line_error(run(*server, "--cert-ips", "300.1.1.1", check=False), "300.1.1.1")
    assert_one_line_error(run(*server, "--event-loop-threads", "0", check=False), "--event-loop-threads 0")
    assert_one_line_error(run(*server[:1], "--pki-dir", tmp_path / "none", check=False), "ca.crt")


def test_demo_runs_once(tmp_path):
    ports = [str(free_port()) for _ in range(4)]
    result = run(BIN / "edgetunnel", "demo", "--once", "--pki-dir", tmp_path / "demo", "--tunnel-port", ports[0],
                 "--secure-port", ports[1], "--meta-port", ports[2], "--agent-meta-port", ports[3])
    assert "hello from edge node demo-edge" in result.stdout
    assert f"-x https://127.0.0.1:{ports[1]} http://demo-edge:" in result.stdout
    assert "warning" not in result.stdout + result.stderr, result.stdout + result.stderr  # a clean demo (issue 29)


def test_demo_stopped_with_ctrl_c_leaves_no_temporary_folder(tmp_path):
    """Issue 29: after Ctrl-C the demo left its edgetunnel-demo-* folder behind, the CA's private key included."""
    ports = [str(free_port()) for _ in range(4)]
    env = dict(os.environ, TMPDIR=str(tmp_path))
    demo = Proc([BIN / "edgetunnel", "demo", "--tunnel-port", ports[0], "--secure-port", ports[1], "--meta-port",
                 ports[2], "--agent-meta-port", ports[3]], tmp_path / "demo.log", env=env)
    try:
        wait_until(lambda: "Press Ctrl-C to stop." in demo.text(), 30, "the demo to run")
        made = [p for p in tmp_path.iterdir() if p.name.startswith("edgetunnel-demo-")]
        assert len(made) == 1 and (made[0] / "server" / "ca.key").exists(), list(tmp_path.iterdir())
        demo.send_signal(signal.SIGINT)
        assert demo.popen.wait(30) == 0
        assert not made[0].exists(), "the demo's temporary folder (with its CA key) outlived it"
        assert "warning" not in demo.text()
    finally:
        demo.stop()


def test_agent_renews_its_certificate_over_the_tunnel(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_server("--agent-certificate-validity", "15s")
        port = c.start_edge_service()
        agent = c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}")
        crt = tmp_path / "agent-edge-1" / "agent.crt"
        first = run("openssl", "x509", "-in", crt, "-noout", "-serial").stdout
        # Renewal is due at two thirds of 15 s; the tunnel stays up throughout.
        wait_until(lambda: run("openssl", "x509", "-in", crt, "-noout", "-serial").stdout != first, 30,
                   "a renewed certificate")
        assert run("openssl", "verify", "-CAfile", c.ca, crt).returncode == 0
        agent.expect_log("node certificate renewed")  # logged after the file is renamed into place
        assert len(c.agents()) == 1
        assert c.curl(f"http://edge-1:{port}/hello", check=True).stdout == "hello from the edge\n"
        # After a restart the agent uses the renewed certificate (the first one has expired by now).
        agent.stop()
        time.sleep(max(0, 16 - 10))
        again = c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}", join=False)
        assert again.alive() and "using node certificate" in again.text()
    finally:
        c.close()


def test_agent_detects_a_dead_server_within_15_seconds(cluster, edge):
    cluster.server.popen.send_signal(signal.SIGSTOP)  # the server stops answering, the socket stays open
    try:
        started = time.monotonic()
        wait_until(lambda: http_get(f"http://127.0.0.1:{cluster.agent.meta}/readyz")[0] == 503, 25,
                   "the agent to declare the tunnel dead")
        # 9 s of silence, checked every second.
        assert time.monotonic() - started < 15
        cluster.agent.expect_log("tunnel is dead")
    finally:
        cluster.server.popen.send_signal(signal.SIGCONT)
    wait_until(lambda: http_get(f"http://127.0.0.1:{cluster.agent.meta}/readyz")[0] == 200, 40, "reconnect")


def test_json_logs_are_one_object_a_line(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_server("--log-format", "json")
        port = c.start_edge_service()
        agent = c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}", "--log-format", "json")
        c.curl("http://ghost:1/", check=False)
        wait_until(lambda: "no agent for node ghost" in c.server.text(), 5, "the refusal to be logged")
        for proc in (c.server, agent):
            lines = [line for line in proc.text().splitlines() if line.strip()]
            assert lines
            records = [json.loads(line) for line in lines]
            assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
        registered = [json.loads(l) for l in c.server.text().splitlines() if "agent registered" in l]
        assert registered and registered[0]["node"] == "edge-1" and registered[0]["level"] == "info"
        bad = run(BIN / "edge-tunnel-server", "--pki-dir", c.pki, "--log-format", "xml", check=False)
        assert_one_line_error(bad, "--log-format", "xml")
        bad = run(BIN / "edge-tunnel-agent", "--server-address", "127.0.0.1:1", "--log-format", "xml", check=False)
        assert_one_line_error(bad, "--log-format", "xml")
    finally:
        c.close()
