"""Who may use the tunnel, and what a refused caller or agent is told: client certificates from the right CA only, no
streams for an agent certificate, HELLOs for another node or another protocol version, a node IP held by another
node, joins with a wrong token or CA hash, the errors a caller sees (502, 403, 400), garbage and half handshakes on
every port; and the server's PINGs on a quiet raw tunnel with edge-1's certificate."""
import contextlib
import json
import random
import socket
import ssl
import time

import pytest

from conftest import BIN, assert_one_line_error, run
from support.harness import frame, free_port, http_get, read_frame, wait_until
from support.tunnel import cluster, edge  # noqa: F401  (fixtures)


def test_errors_say_what_happened(cluster, edge):
    unknown = cluster.curl("http://ghost-node:10250/", "-v")
    assert "502" in unknown.stderr and unknown.returncode != 0

    status, sock = cluster.connect_stream("ghost-node:10250")
    assert status == "HTTP/1.1 502 Bad Gateway"
    assert b"no agent for node ghost-node" in sock.recv(4096)

    # Not on the allow list: 403, and the agent never dials (the listener sees no connection).
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    forbidden = listener.getsockname()[1]
    status, sock = cluster.connect_stream(f"edge-1:{forbidden}")
    assert status == "HTTP/1.1 403 Forbidden"
    assert b"refused by agent policy" in sock.recv(4096)
    with pytest.raises(socket.timeout):
        listener.accept()
    listener.close()

    # Allowed but nothing listens: 502 naming the target.
    closed_port = free_port()
    agent2 = cluster.start_agent("edge-2", "--allow", f"127.0.0.1:{closed_port}", ips=("127.0.0.2",))
    status, sock = cluster.connect_stream(f"edge-2:{closed_port}")
    assert status == "HTTP/1.1 502 Bad Gateway"
    assert b"refused the connection" in sock.recv(4096)

    # Malformed targets: 400.
    for target in ["edge-1", "edge-1:99999", "edge-1:http", "bad host:80"]:
        status, sock = cluster.connect_stream(target)
        assert status == "HTTP/1.1 400 Bad Request", target

    assert agent2.alive() and cluster.agent.alive()
    metrics = http_get(cluster.meta_url("/metrics"))[1]
    assert 'edge_tunnel_server_dial_failures_total{reason="no_agent"}' in metrics
    assert 'edge_tunnel_server_dial_failures_total{reason="policy"}' in metrics
    agent_metrics = http_get(f"http://127.0.0.1:{cluster.agent.meta}/metrics")[1]
    assert "edge_tunnel_agent_refused_total 1" in agent_metrics


def test_callers_need_a_client_certificate_from_the_right_ca(cluster, edge, tmp_path):
    # No client certificate on the secure port.
    no_cert = run("curl", "-sS", "--proxy-cacert", cluster.ca, "-p", "-x",
                  f"https://127.0.0.1:{cluster.ports['secure']}", f"http://edge-1:{edge}/hello", check=False)
    assert no_cert.returncode != 0 and "hello" not in no_cert.stdout

    # A certificate from another CA, on both TLS ports.
    other = tmp_path / "other"
    run(BIN / "edgetunnel", "pki", "init", "--pki-dir", other)
    run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", other, "--name", "intruder")
    wrong = run("curl", "-sS", "--proxy-cacert", cluster.ca, "--proxy-cert", other / "intruder.crt",
                "--proxy-key", other / "intruder.key", "-p", "-x", f"https://127.0.0.1:{cluster.ports['secure']}",
                f"http://edge-1:{edge}/hello", check=False)
    assert wrong.returncode != 0 and "hello" not in wrong.stdout
    context = cluster.tls_context(other / "intruder.crt", other / "intruder.key")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with socket.create_connection(("127.0.0.1", cluster.ports["tunnel"]), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                tls.sendall(frame(1, 0, b"{}"))
                read_frame(tls)

    # The edge service is still reachable for a proper caller.
    assert cluster.curl(f"http://edge-1:{edge}/hello", check=True).stdout == "hello from the edge\n"


def test_an_agent_certificate_cannot_open_streams(cluster, edge):
    agent_pki = cluster.tmp / "agent-edge-1"
    status, sock = cluster.connect_stream(f"edge-1:{edge}", cert=agent_pki / "agent.crt", key=agent_pki / "agent.key")
    assert status == "HTTP/1.1 403 Forbidden"


@contextlib.contextmanager
def tunnel_as_edge1(cluster, hello):
    """A raw tunnel connection with node edge-1's certificate that has said HELLO (nodeIPs and capabilities
    empty unless `hello` says otherwise); yields the TLS socket."""
    agent_pki = cluster.tmp / "agent-edge-1"
    context = cluster.tls_context(agent_pki / "agent.crt", agent_pki / "agent.key")
    with socket.create_connection(("127.0.0.1", cluster.ports["tunnel"]), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            tls.sendall(frame(1, 0, json.dumps({"nodeIPs": [], "capabilities": [], **hello}).encode()))
            yield tls


def hello_with_edge1_certificate(cluster, hello):
    """Says HELLO on the tunnel port with node edge-1's certificate; returns the answer's type and payload."""
    with tunnel_as_edge1(cluster, hello) as tls:
        frame_type, _, payload = read_frame(tls)
    return frame_type, payload


def test_a_registration_for_another_node_is_refused(cluster, edge):
    """An agent holding node edge-1's certificate says HELLO as edge-9: refused with the reason."""
    frame_type, payload = hello_with_edge1_certificate(cluster, {"version": 2, "nodeName": "edge-9"})
    assert frame_type == 15  # REFUSED
    reason = json.loads(payload)["reason"]
    assert "edge-1" in reason and "edge-9" in reason
    cluster.server.expect_log("registration refused")
    assert [a["nodeName"] for a in cluster.agents()] == ["edge-1"]


def test_an_agent_of_another_protocol_version_is_refused_with_the_reason(cluster, edge):
    """Version 1 agents (JSON OPEN) cannot talk to this server: told so at HELLO, not broken at the first stream."""
    frame_type, payload = hello_with_edge1_certificate(cluster, {"version": 1, "nodeName": "edge-1"})
    assert frame_type == 15  # REFUSED
    assert json.loads(payload)["reason"] == "protocol version 1 is not supported (server speaks 2 to 3)"
    assert [a["nodeName"] for a in cluster.agents()] == ["edge-1"]


def test_the_server_pings_a_quiet_tunnel_only(cluster, edge):
    """The server PINGs a tunnel on which nothing arrived for its interval (5 s), and not one whose agent PINGs on
    its own: with 10,000 agents, PINGs on top of theirs would be thousands of TLS records a second."""
    cluster.agent.stop()
    wait_until(lambda: cluster.agents() == [], 10, "the agent to be gone")
    with tunnel_as_edge1(cluster, {"version": 2, "nodeName": "edge-1"}) as tls:
        assert read_frame(tls)[0] == 2  # HELLO_OK

        def frames_for(seconds, ping_every=None):
            """Frame types received for `seconds`; PINGs of the server are answered, ours sent every ping_every."""
            seen, end, next_ping = [], time.monotonic() + seconds, time.monotonic()
            tls.settimeout(0.2)
            while time.monotonic() < end:
                if ping_every and time.monotonic() >= next_ping:
                    tls.sendall(frame(10, 0, b"agent-pg"))
                    next_ping += ping_every
                try:
                    frame_type, _, payload = read_frame(tls)
                except socket.timeout:
                    continue
                seen.append(frame_type)
                if frame_type == 10:
                    tls.sendall(frame(11, 0, payload))
            return seen

        quiet = frames_for(11)
        assert 10 in quiet, f"no PING on a quiet tunnel: {quiet}"
        chatty = frames_for(11, ping_every=1)
        assert 10 not in chatty and chatty.count(11) >= 9, chatty


def test_a_node_ip_held_by_another_node_is_refused(cluster, edge):
    """Node IPs are bound to certificates at the join: a second node naming edge-1's IP does not get a
    certificate at all (it exits with the reason), and edge-1 keeps its tunnel and its IP."""
    second = cluster.start_agent("edge-2", ips=("127.0.0.1",), wait=False).expect_exit()
    assert second.popen.wait(30) != 0
    assert "join refused: node IP 127.0.0.1 belongs to node edge-1" in second.own_text(), second.own_text()
    cluster.server.expect_log("node IP 127.0.0.1 belongs to node edge-1")
    assert not (cluster.tmp / "agent-edge-2" / "agent.crt").exists()
    assert [(a["nodeName"], a["nodeIPs"]) for a in cluster.agents()] == [("edge-1", ["127.0.0.1"])]


def test_join_with_a_wrong_token_or_ca_hash_is_refused_clearly(cluster, tmp_path):
    token = cluster.token()
    wrong_secret = token.split(".")[0] + ".0000000000000000"
    args = [BIN / "edge-tunnel-agent", "--node-name", "edge-x", "--server-address",
            f"127.0.0.1:{cluster.ports['tunnel']}", "--meta-port", free_port()]
    bad_token = run(*args, "--pki-dir", tmp_path / "a", "--bootstrap-token", wrong_secret,
                    "--ca-cert-hash", cluster.ca_hash, check=False)
    assert bad_token.returncode != 0
    assert "join refused" in bad_token.stderr and "bootstrap token is not valid" in bad_token.stderr
    assert not (tmp_path / "a" / "agent.crt").exists()
    cluster.server.expect_log("has a wrong secret")  # the operator is told which, the prober is not
    unknown_id = run(*args, "--pki-dir", tmp_path / "a", "--bootstrap-token", "zzzzzz." + token.split(".")[1],
                     "--ca-cert-hash", cluster.ca_hash, check=False)
    assert unknown_id.returncode != 0
    answer = lambda result: [line for line in result.stderr.splitlines() if "join refused" in line][-1].split("join refused")[1]
    assert answer(unknown_id) == answer(bad_token), "an unknown token id and a wrong secret must get one answer"

    bad_hash = run(*args, "--pki-dir", tmp_path / "b", "--bootstrap-token", token,
                   "--ca-cert-hash", "sha256:" + "0" * 64, check=False)
    assert bad_hash.returncode != 0
    assert "not the pinned" in bad_hash.stderr
    assert not (tmp_path / "b" / "agent.crt").exists()

    no_credentials = run(*args, "--pki-dir", tmp_path / "c", check=False)
    assert_one_line_error(no_credentials, "no node certificate", "--bootstrap-token")

    malformed = run(*args, "--pki-dir", tmp_path / "d", "--bootstrap-token", "nope", check=False)
    assert_one_line_error(malformed, "malformed bootstrap token")


def test_garbage_and_half_handshakes_on_every_port_do_not_disturb_others(cluster, edge):
    held = []
    rng = random.Random(7)
    for port in cluster.ports.values():
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4096))))
            held.append(s)
        # A half-finished TLS handshake: the first bytes of a ClientHello, then silence.
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(bytes.fromhex("160301020001"))
        held.append(s)
    assert cluster.curl(f"http://edge-1:{edge}/hello", check=True).stdout == "hello from the edge\n"
    assert http_get(cluster.meta_url("/healthz"))[0] == 200
    assert cluster.server.alive() and cluster.agent.alive()
    for s in held:
        s.close()
