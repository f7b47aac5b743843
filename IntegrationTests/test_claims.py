"""Claims of the docs that had no test (issue 29, "Claims with no test"), each held to what the docs say against the
real binaries: real TLS (openssl, Python's ssl), real agents or raw agents with real certificates, real callers.

Where a claim lives:
- TLS 1.3 only on 10262, and an operator's certificate there closed: PROTOCOL.md ("TLS 1.3 (nothing older is
  accepted)", "Connections"), OPERATIONS.md ("Ports"); `TLSContexts.tunnelServer`, `TunnelConnectionClassifier`.
- Resuming (`--resume-grace-seconds 0`, 502 while suspended, what ends suspended streams, GOAWAY/REFUSED, the
  agent's redial, 16 tokens, 2,048 streams): PROTOCOL.md "Resuming a tunnel", OPERATIONS.md, SECURITY.md "Limits";
  `AgentSession(+Hello)`, `AgentRegistry`, `TunnelMux+Resume`, `AgentTunnel`, `EdgeTunnelAgent.keepTunnelUp`.
  (503 while a takeover is under way is a Swift test: `ResumeClaimsTests`, the window is too short to hit from outside.)
- `--replica-warmup`: OPERATIONS.md "Several replicas", PROTOCOL.md; `TunnelServer.replicaWarmingUp`.
- LoadBalancer hostnames and `--node-objects`: OPERATIONS.md "Kubernetes objects the server follows";
  `ServiceAddresses`, `AgentSession.handleHello`.
- A connection bound to its first node: OPERATIONS.md "Ports"; `HostRouter`.
- `--event-loop-threads`: OPERATIONS.md "Threads"; `ServerConfiguration.eventLoopThreads`.
- 64 lookups: SECURITY.md "Limits"; `NameLookups`.
- The `nodes.json` lock: SECURITY.md "Identity"; `NodeStore.withFileLock`.
- Secret mode 0440: SECURITY.md "Several replicas"; `Manifests` (the CA volume), the server's `--ca-dir`.
- Revocation within two seconds: SECURITY.md "Identity"; `TunnelServer.watchIdentities`, `AgentSession.cutOff`.
"""
import fcntl
import json
import os
import pathlib
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import yaml

from conftest import BIN, run
from support.harness import (metric_of, PYTHON_HELPER_EXITS, Cluster, FakeServer, connection_end, frame, free_port,
                             http_get, read_frame, read_head, recv_exact, wait_until)

HERE = pathlib.Path(__file__).resolve().parent
HELLO, HELLO_OK, OPEN, OPEN_OK, OPEN_FAIL, DATA, RST, PING, PONG, GOAWAY, REFUSED, RESUME = \
    1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 15, 19


# ---------------------------------------------------------------------------------------------------------------
# Helpers: raw agents with real certificates, metrics, logs.

def agent_cert(c, name):
    """A node certificate of the cluster's CA for `name`, issued without a join (no record in nodes.json)."""
    out = c.tmp / "issued"
    if not (out / f"{name}.crt").exists():
        run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", c.pki, "--name", name, "--org",
            "edge-tunnel:agents", "--out-dir", out)
    return out / f"{name}.crt", out / f"{name}.key"


def raw_hello(c, node, version=3, tokens=None):
    """A raw agent connection of `node`: HELLO (naming `tokens`), then (frame type, JSON payload, TLS socket)."""
    raw = socket.create_connection(("127.0.0.1", c.ports["tunnel"]), timeout=10)
    tls = c.tls_context(*agent_cert(c, node)).wrap_socket(raw)
    body = {"version": version, "nodeName": node, "nodeIPs": [], "capabilities": []}
    if tokens is not None:
        body["resumeTokens"] = tokens
    tls.sendall(frame(HELLO, 0, json.dumps(body).encode()))
    frame_type, _, payload = read_frame(tls)
    return frame_type, json.loads(payload), tls


def hello_answer(c, node, **options):
    """The frame type a raw agent's HELLO is answered with (its connection closed again)."""
    frame_type, _, tls = raw_hello(c, node, **options)
    tls.close()
    return frame_type


def registered(c, node, **options):
    frame_type, ok, tls = raw_hello(c, node, **options)
    assert frame_type == HELLO_OK, ok
    return ok, tls


def stream_through(c, tls, node):
    """A caller's CONNECT to `node` through the secure port, answered by the raw agent on `tls` (OPEN_OK and 5 bytes):
    returns (stream id, the caller's TLS socket), the 5 bytes read. The socket raises on an end without
    close_notify, so that `connection_end` tells a reset."""
    result = {}
    caller = threading.Thread(target=lambda: result.update(
        answer=c.connect_stream(f"{node}:10250", timeout=10, ragged_eof_is_error=True)))
    caller.start()
    while True:
        frame_type, stream_id, payload = read_frame(tls)
        if frame_type == PING:
            tls.sendall(frame(PONG, 0, payload))
        elif frame_type == OPEN:
            tls.sendall(frame(OPEN_OK, stream_id, (1 << 20).to_bytes(4, "big")) + frame(DATA, stream_id, b"12345"))
            break
    caller.join(10)
    status, sock = result["answer"]
    assert status == "HTTP/1.1 200 Connection established", status
    assert recv_exact(sock, 5) == b"12345"
    return stream_id, sock


def still_open(sock, seconds):
    """True if nothing arrives on `sock` and it does not end for `seconds` (a caller that sees a pause)."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(1)
    except socket.timeout:
        return True
    except (OSError, ssl.SSLError):
        return False
    finally:
        sock.settimeout(None)
    raise AssertionError(f"the stream carried {data!r} while it should wait")


def server_metric(c, name):
    return metric_of(http_get(c.meta_url("/metrics"))[1], name)


def agent_metric(agent, name):
    return metric_of(http_get(f"http://127.0.0.1:{agent.meta}/metrics")[1], name)


def log_count(proc, words):
    return proc.own_text().count(words)


def wait_log_count(proc, words, count, timeout=10):
    wait_until(lambda: log_count(proc, words) >= count, timeout, f"{count}× the log line {words!r}")


def lose_tunnel_with_a_stream(c, node, **hello):
    """A raw agent of `node` registers (version 3), carries one caller's stream, and its connection is lost: the
    stream waits. Returns (the HELLO_OK, the stream id, the caller's socket)."""
    waits = log_count(c.server, "agent connection lost: its 1 streams wait 30s")
    ok, tls = registered(c, node, **hello)
    assert len(ok["resumeToken"]) == 32 and ok["resumeGraceSeconds"] == 30, ok
    stream_id, sock = stream_through(c, tls, node)
    tls.close()  # the connection is lost (a FIN without close_notify) with the stream open
    wait_log_count(c.server, "agent connection lost: its 1 streams wait 30s", waits + 1)
    return ok, stream_id, sock


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


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
# Resuming: what suspends, what does not, and the bounds.

class Target:
    """A TCP service on the edge node (loopback), keeping every connection it accepted."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)

    def connection(self, timeout=10):
        wait_until(lambda: self.conns, timeout, "a connection to the target")
        return self.conns[0]

    def close(self):
        self.listener.close()
        for conn in self.conns:
            conn.close()


def plain_end(sock, timeout):
    """How a plain TCP connection ended within `timeout` s: "reset", "FIN", or None (still open, nothing came)."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except socket.timeout:
        return None
    except ConnectionResetError:
        return "reset"
    finally:
        sock.settimeout(None)
    assert data == b"", f"unexpected bytes {data!r}"
    return "FIN"


def kill_the_agents_tunnel(c):
    """Destroys the agent's end of its tunnel connection (`ss -K`): the server gets a reset, the agent an error."""
    run("ss", "-K", "dst", "127.0.0.1", "dport", "=", str(c.ports["tunnel"]))


@pytest.mark.parametrize("grace", [0, 30])
def test_with_resume_grace_zero_a_lost_tunnels_streams_end_at_once(cluster, grace):
    """OPERATIONS.md: `--resume-grace-seconds N` (default 30; 0 turns it off). A real agent carries a caller's
    stream to a service on its node; its tunnel connection is destroyed under both (ss -K).
    - 0: nothing is suspended. The caller's connection and the target's connection are reset at once (within 2 s),
      HELLO_OK gave the agent no token, neither side counts a suspended tunnel, and the server logs no wait.
    - 30 (the contrast, what 0 turns off): both ends wait, and the stream carries on once the agent is back."""
    c = cluster
    target = Target()
    try:
        c.start_server("--resume-grace-seconds", str(grace))
        ok, raw = registered(c, "edge-9")  # what a version-3 agent is told at HELLO
        raw.close()
        assert (ok.get("resumeToken") is None) == (grace == 0), ok
        agent = c.start_agent("edge-1", "--allow", f"127.0.0.1:{target.port}")
        status, caller = c.connect_stream(f"edge-1:{target.port}", ragged_eof_is_error=True)
        assert status == "HTTP/1.1 200 Connection established", status
        edge = target.connection()
        caller.sendall(b"ping")
        assert recv_exact(edge, 4) == b"ping"
        kill_the_agents_tunnel(c)
        cut = time.monotonic()
        if grace == 0:
            assert plain_end(edge, 2) == "reset", "the target's connection must be reset at once"
            assert connection_end(caller, timeout=max(0.1, cut + 2 - time.monotonic())) == "reset"
            assert time.monotonic() - cut < 2
            assert agent_metric(agent, "edge_tunnel_agent_suspended_tunnels") == 0
            assert server_metric(c, "edge_tunnel_server_suspended_tunnels") == 0
            assert "streams wait" not in c.server.own_text()
            assert "wait to resume" not in agent.own_text()
            agent.expect_log("tunnel to 127.0.0.1")  # it noticed, and goes on
        else:
            agent.expect_log("wait to resume", timeout=5)
            assert plain_end(edge, 1) is None and still_open(caller, 1)
            wait_until(lambda: agent_metric(agent, 'edge_tunnel_agent_tunnel_resumes_total{outcome="resumed"}') == 1,
                       15, "the agent's streams resumed")
            caller.sendall(b"pong")
            assert recv_exact(edge, 4) == b"pong"
            edge.sendall(b"back")
            assert recv_exact(caller, 4) == b"back"
            caller.close()
    finally:
        target.close()


def test_while_suspended_the_node_answers_502_and_revoke_and_reset_end_the_waiting_streams(cluster):
    """PROTOCOL.md: "while the tunnel is suspended, the node is not routable (502). Revoking or resetting the node
    ... end suspended streams at once". Raw agents edge-1 and edge-2 lose their tunnels with a stream open; a new
    caller for edge-1 gets 502 while its old stream waits; `edgetunnel node revoke edge-1` and `node reset edge-2`
    each reset the waiting caller's connection within the server's 2-s re-read of nodes.json (a suspended stream
    would otherwise wait 30 s), and the server counts no suspended tunnel after."""
    c = cluster
    c.start_server()
    waiting = {}
    for node in ("edge-1", "edge-2"):
        _, _, waiting[node] = lose_tunnel_with_a_stream(c, node)
    assert server_metric(c, "edge_tunnel_server_suspended_tunnels") == 2
    status, refused = c.connect_stream("edge-1:10250", timeout=10)
    assert status.startswith("HTTP/1.1 502"), status
    assert b"no agent for node edge-1" in refused.recv(4096)
    refused.close()
    assert still_open(waiting["edge-1"], 0.5) and still_open(waiting["edge-2"], 0.1)

    for verb, node in (("revoke", "edge-1"), ("reset", "edge-2")):
        run(BIN / "edgetunnel", "node", verb, "--pki-dir", c.pki, node)
        done = time.monotonic()
        assert connection_end(waiting[node], timeout=4) == "reset", f"{verb}: the waiting stream must end loudly"
        print(f"node {verb}: the suspended stream ended {time.monotonic() - done:.2f} s after the command returned")
        assert time.monotonic() - done < 3
    c.server.expect_log("node edge-1 is revoked or was reset: its certificate is no longer accepted: ending its "
                        "suspended streams")
    c.server.expect_log("node edge-2 is revoked or was reset: its certificate is no longer accepted: ending its "
                        "suspended streams")
    wait_until(lambda: server_metric(c, "edge_tunnel_server_suspended_tunnels") == 0, 5, "no suspended tunnel")


@pytest.mark.parametrize("how", ["goaway", "refused", "lost"])
def test_a_tunnel_the_agent_closes_on_purpose_does_not_suspend(cluster, how):
    """PROTOCOL.md: "and so does a connection closed on purpose: after a GOAWAY from either side, or a REFUSED". A
    raw version-3 agent (its tunnel resumable) carries a caller's stream, then sends GOAWAY, or REFUSED, and its
    connection ends: the caller's connection is reset at once and nothing is suspended. "lost" is the contrast: the
    same connection ending without either frame suspends the stream, and the caller waits."""
    c = cluster
    c.start_server()
    ok, tls = registered(c, "edge-1")
    assert ok.get("resumeToken"), ok
    _, caller = stream_through(c, tls, "edge-1")
    if how == "goaway":
        tls.sendall(frame(GOAWAY, 0, json.dumps({"reason": "agent shutting down"}).encode()))
    elif how == "refused":
        tls.sendall(frame(REFUSED, 0, json.dumps({"reason": "the agent refuses this tunnel"}).encode()))
    time.sleep(0.2)  # the frame is read before the connection ends (as when the agent closes after sending it)
    tls.close()
    ended = time.monotonic()
    if how == "lost":
        c.server.expect_log("agent connection lost: its 1 streams wait 30s")
        assert still_open(caller, 2)
        assert server_metric(c, "edge_tunnel_server_suspended_tunnels") == 1
        caller.close()
        return
    assert connection_end(caller, timeout=3) == "reset", f"after {how} the stream must end, loudly"
    assert time.monotonic() - ended < 2
    assert server_metric(c, "edge_tunnel_server_suspended_tunnels") == 0
    assert "streams wait" not in c.server.own_text()


def fake_with_a_resumable_stream(c, target, grace=30):
    """A fake server in the real one's place, a real agent registered with it (HELLO_OK with a resume token) and
    one stream to `target` open: returns (fake, agent, tunnel, the target's connection)."""
    fake = FakeServer.replacing(c, "edge-1", "--allow", f"127.0.0.1:{target.port}")
    agent = c.start_agent("edge-1", "--allow", f"127.0.0.1:{target.port}", join=False, wait=False,
                          pki=c.tmp / "agent-edge-1")
    tls, hello = fake.hello()
    assert hello["version"] == 3, hello
    ok = {"serverID": "fake", "maxFramePayload": 262144, "pingIntervalSeconds": 5, "resumeToken": "a" * 32,
          "resumeGraceSeconds": grace}
    tls.sendall(frame(HELLO_OK, 0, json.dumps(ok).encode()))
    wait_until(lambda: http_get(f"http://127.0.0.1:{agent.meta}/readyz")[0] == 200, 10, "the agent registered")
    target_name = f"127.0.0.1:{target.port}".encode()
    tls.sendall(frame(OPEN, 1, (1 << 20).to_bytes(4, "big") + target_name))
    frame_type, _ = FakeServer.next_for(tls, 1)
    assert frame_type == OPEN_OK, frame_type
    edge = target.connection()
    tls.sendall(frame(DATA, 1, b"hello"))
    assert recv_exact(edge, 5) == b"hello"
    return fake, agent, tls, edge


@pytest.mark.parametrize("how", ["goaway", "refused", "lost"])
def test_an_agent_whose_server_closes_on_purpose_does_not_suspend(cluster, how):
    """The agent's side of the same claim: its server sends GOAWAY (a drain) or REFUSED (revoked) on a resumable
    tunnel with a stream open, then the connection ends. The agent ends the stream at once: its connection to the
    target closes within 2 s, and it counts no suspended tunnel. "lost" is the contrast: the same end without
    either frame suspends the stream, and the target's connection stays open."""
    c = cluster
    target = Target()
    try:
        fake, agent, tls, edge = fake_with_a_resumable_stream(c, target)
        if how == "goaway":
            tls.sendall(frame(GOAWAY, 0, json.dumps({"reason": "server shutting down"}).encode()))
            agent.expect_log("is draining")
        elif how == "refused":
            tls.sendall(frame(REFUSED, 0, json.dumps({"reason": "node edge-1 is revoked"}).encode()))
            agent.expect_log("refused the tunnel: node edge-1 is revoked")
        tls.close()
        ended = time.monotonic()
        if how == "lost":
            agent.expect_log("wait to resume", timeout=5)
            assert plain_end(edge, 2) is None
            assert agent_metric(agent, "edge_tunnel_agent_suspended_tunnels") == 1
        else:
            assert plain_end(edge, 2) is not None, f"after {how} the agent must end the stream at once"
            assert time.monotonic() - ended < 2
            assert agent_metric(agent, "edge_tunnel_agent_suspended_tunnels") == 0
            assert "wait to resume" not in agent.own_text()
        fake.close()
    finally:
        target.close()


def test_the_agent_redials_at_least_once_a_second_while_its_streams_wait(cluster):
    """PROTOCOL.md: "while a tunnel is suspended it dials again at least every second". A real agent's resumable
    tunnel (to a fake server) is lost with a stream open; every dial after that fails (the fake accepts and closes
    at once). Over 6 s the agent dials again and again, never more than a second (plus the failed dial's own
    time) apart, where its backoff alone (0.5 s doubling, full jitter) would wait up to 2, 4, 8 s."""
    c = cluster
    target = Target()
    try:
        fake, agent, tls, _ = fake_with_a_resumable_stream(c, target)
        tls.close()
        agent.expect_log("wait to resume", timeout=5)
        dials = []
        fake.listener.settimeout(3)
        until = time.monotonic() + 6
        while time.monotonic() < until:
            try:
                conn, _ = fake.listener.accept()
            except socket.timeout:
                break
            conn.settimeout(2)
            try:
                first = conn.recv(1, socket.MSG_PEEK)
            except OSError:
                first = b""
            if first == b"\x16":  # a TLS ClientHello: a tunnel dial (not a replica probe)
                dials.append(time.monotonic())
            conn.close()
        gaps = [b - a for a, b in zip(dials, dials[1:])]
        print(f"{len(dials)} dials, gaps {[round(g, 2) for g in gaps]}")
        assert len(dials) >= 5, dials
        assert max(gaps) <= 1.3, f"the agent waited {max(gaps):.2f} s between dials while its streams waited"
        assert agent_metric(agent, "edge_tunnel_agent_suspended_tunnels") == 1
        fake.close()
    finally:
        target.close()


def test_a_hello_names_at_most_16_resume_tokens(cluster):
    """PROTOCOL.md: `resumeTokens` (version 3, at most 16). A raw agent's lost tunnel waits with a stream; it comes
    back naming 16 other tokens and then the right one: the 17th is not looked at, nothing is resumed, and the
    waiting stream ends (the node came back without it). Again, with the right token 16th: resumed."""
    c = cluster
    c.start_server()
    ok, _, sock = lose_tunnel_with_a_stream(c, "edge-1")
    others = [f"{i:032x}" for i in range(1, 17)]
    back, tls = registered(c, "edge-1", tokens=others + [ok["resumeToken"]])
    assert not back.get("resumed"), "a token past the 16th was looked at"
    assert connection_end(sock, timeout=5) == "reset"
    tls.close()

    ok, stream_id, sock = lose_tunnel_with_a_stream(c, "edge-1")
    back, tls = registered(c, "edge-1", tokens=others[:15] + [ok["resumeToken"]])
    assert back.get("resumed") is True, "the 16th token must be looked at"
    frame_type, _, payload = read_frame(tls)
    assert frame_type == RESUME and [s["id"] for s in json.loads(payload)["streams"]] == [stream_id]
    tls.sendall(frame(RESUME, 0, json.dumps({"streams": []}).encode()))
    tls.close()
    sock.close()


def test_a_resume_lists_at_most_2048_streams_and_resets_the_rest(cluster):
    """PROTOCOL.md: "A RESUME lists at most 2,048 streams ...; the rest of a tunnel's streams are reset". A raw agent
    holds 2,049 callers' streams (CONNECTs on the insecure port) when its connection is lost; it comes back with its
    token: the server's RESUME lists the 2,048 lowest ids, and the caller of the 2,049th is reset at once while the
    others still wait."""
    c = cluster
    count = 2049
    c.start_server()
    ok, tls = registered(c, "edge-1")
    opened = []

    def answer_opens():
        while len(opened) < count:
            frame_type, stream_id, payload = read_frame(tls)
            if frame_type == PING:
                tls.sendall(frame(PONG, 0, payload))
            elif frame_type == OPEN:
                tls.sendall(frame(OPEN_OK, stream_id, (16 << 10).to_bytes(4, "big")))
                opened.append(stream_id)

    responder = threading.Thread(target=answer_opens, daemon=True)
    responder.start()
    callers = []
    started = time.monotonic()
    for first in range(0, count, 64):
        batch = [socket.create_connection(("127.0.0.1", c.ports["insecure"]), timeout=20)
                 for _ in range(min(64, count - first))]
        for sock in batch:
            sock.sendall(b"CONNECT edge-1:10250 HTTP/1.1\r\nHost: edge-1:10250\r\n\r\n")
        for sock in batch:
            head = read_head(sock)
            assert head.startswith(b"HTTP/1.1 200"), head
        callers.extend(batch)
    responder.join(20)
    print(f"{count} streams opened in {time.monotonic() - started:.1f} s")
    assert len(opened) == count
    tls.close()
    c.server.expect_log(f"agent connection lost: its {count} streams wait 30s", timeout=10)
    back, tls = registered(c, "edge-1", tokens=[ok["resumeToken"]])
    assert back.get("resumed") is True
    frame_type, _, payload = read_frame(tls)
    assert frame_type == RESUME
    listed = [s["id"] for s in json.loads(payload)["streams"]]
    assert len(listed) == 2048 and listed == sorted(opened)[:2048], (len(listed), listed[-3:])
    # The caller of the stream left out (the highest id: the last one opened) is reset; the others wait.
    last = callers[opened.index(max(opened))]
    assert plain_end(last, 3) == "reset"
    assert plain_end(callers[0], 0.5) is None and plain_end(callers[2047], 0.1) is None
    tls.sendall(frame(RESUME, 0, json.dumps({"streams": []}).encode()))  # none: the server resets them all
    assert plain_end(callers[0], 5) == "reset"
    tls.close()
    for sock in callers:
        sock.close()


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


def in_private_mounts(binds, args):
    """`args` in a mount namespace of its own where each (file, over) of `binds` is bind-mounted over `over`: the
    process sees another /etc/hosts or /etc/resolv.conf, and nothing else changes. The process is the
    same (sh execs it), so signals reach it."""
    mounts = "".join(f'mount --bind "{f}" "{over}" && ' for f, over in binds)
    return ["unshare", "--mount", "sh", "-c", mounts + 'exec "$0" "$@"', *map(str, args)]


def needs_mount_namespaces():
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root (a mount namespace with bind mounts) and unshare")


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
# Replicas, routing, threads, lookups.

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


class SilentDNS:
    """A DNS server that never answers, on a loopback address of its own: a lookup through it waits its timeout."""

    def __init__(self, folder):
        self.address = f"127.53.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.address, 53))
        self.resolv = pathlib.Path(folder) / "resolv.conf"
        self.resolv.write_text(f"nameserver {self.address}\noptions timeout:30 attempts:1\n")

    def close(self):
        self.sock.close()


def test_at_most_64_name_lookups_wait_on_the_agent(cluster):
    """SECURITY.md, "Limits": the agent resolves a name target "on one serial queue, at most 64 lookups waiting ...
    503 past 64 lookups waiting". A real agent whose DNS server never answers (its own /etc/resolv.conf) gets 70
    OPENs for an allowed name from its server (a fake with the real serving certificate): 64 wait for their lookup,
    and the other 6 are answered at once with OPEN_FAIL 503 and the reason."""
    needs_mount_namespaces()
    c = cluster
    dns = SilentDNS(c.tmp)
    try:
        fake = FakeServer.replacing(c, "edge-1")
        meta = free_port()
        agent = c.spawn(in_private_mounts([(dns.resolv, "/etc/resolv.conf")], [
            BIN / "edge-tunnel-agent", "--node-name", "edge-1", "--server-address", f"127.0.0.1:{c.ports['tunnel']}",
            "--pki-dir", c.tmp / "agent-edge-1", "--meta-port", meta, "--allow", "slow.example.com:80"]),
            "agent-edge-1")
        agent.meta = meta
        tls = fake.accept()
        ids = list(range(1, 2 * 70, 2))
        tls.sendall(b"".join(frame(OPEN, i, (1 << 20).to_bytes(4, "big") + b"slow.example.com:80") for i in ids))
        failed = {}
        tls.settimeout(0.2)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                frame_type, stream_id, payload = read_frame(tls)
            except (socket.timeout, ssl.SSLError):
                continue
            if frame_type == PING:
                tls.sendall(frame(PONG, 0, payload))
            else:
                assert frame_type == OPEN_FAIL, (frame_type, stream_id, payload)
                failed[stream_id] = json.loads(payload)
        print(f"{len(failed)} refused at once: {sorted(failed)}")
        assert sorted(failed) == ids[64:], sorted(failed)
        for answer in failed.values():
            assert answer["code"] == 503 and "too many name lookups are waiting" in answer["reason"], answer
        tls.close()  # not resumable: the 64 waiting streams end with it
        fake.close()
        agent.stop()
    finally:
        dns.close()


# ---------------------------------------------------------------------------------------------------------------
# The join state and the CA on disk; revocation.

def nodes_json(c):
    path = c.pki / "nodes.json"
    return {n["name"]: n for n in json.loads(path.read_text())["nodes"]} if path.exists() else {}


def test_changes_to_nodes_json_wait_for_its_lock(cluster):
    """SECURITY.md, "Identity": "Changes to nodes.json take an exclusive flock, so an operator's revoke and a server's
    join never overwrite each other". While another holder has the lock (nodes.json.lock, as a server in the middle of
    recording a join holds it), `edgetunnel node revoke` waits and nodes.json stays as it was, and so does a join
    through the server; once the lock is released, both are written, neither lost."""
    c = cluster
    c.start_server()
    c.start_agent("edge-1").stop()
    before = (c.pki / "nodes.json").read_bytes()
    with open(c.pki / "nodes.json.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        revoke = subprocess.Popen([str(BIN / "edgetunnel"), "node", "revoke", "--pki-dir", str(c.pki), "edge-1"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        joining = c.start_agent("edge-2", ips=("127.0.0.2",), wait=False)
        time.sleep(2)  # the time a revoke and a join take many times over: held up by the lock, they are still waiting
        assert revoke.poll() is None, f"the revoke did not wait for the lock: {revoke.communicate()}"
        assert (c.pki / "nodes.json").read_bytes() == before
        assert not (c.tmp / "agent-edge-2" / "agent.crt").exists()
        fcntl.flock(lock, fcntl.LOCK_UN)
    out, err = revoke.communicate(timeout=20)
    assert revoke.returncode == 0, err
    wait_until(lambda: http_get(f"http://127.0.0.1:{joining.meta}/readyz")[0] == 200, 20, "edge-2 joined")
    nodes = nodes_json(c)
    assert nodes["edge-1"].get("revoked") and nodes["edge-2"].get("joined") and not nodes["edge-2"].get("revoked"), \
        nodes


SECRET_GROUP = 65532


def test_the_ca_secret_is_mounted_0440_and_the_server_runs_from_it(cluster):
    """SECURITY.md, "Several replicas": "The CA key reaches every replica from a Secret mounted read-only (mode 0440,
    group 65532)". The manifests render the Secret volume with defaultMode 0440, mounted read-only, in a pod of user
    and group 65532 with fsGroup 65532. Mounted as the kubelet would (files root's, group fsGroup, that mode), the
    server run as that user from the manifests' server.yaml serves, issues its own certificates into its state
    folder, signs an agent's join with the CA key, and leaves the CA folder as it was."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (to own files as another user and run as it) and setpriv")
    c = cluster
    docs = [d for d in yaml.safe_load_all(run(BIN / "edgetunnel", "manifests", "--mode", "internet", "--image", "x",
                                               "--server-address", "a:10262").stdout) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "edge-tunnel-server")
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "ca")
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "ca")
    assert volume["secret"]["defaultMode"] == 0o440 and mount["readOnly"] is True, (volume, mount)
    security = pod["securityContext"]
    assert security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == SECRET_GROUP, security
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap"
                                 and "server.yaml" in d.get("data", {}))["data"]["server.yaml"])
    assert config["caDir"] == mount["mountPath"], config

    # The Secret as the kubelet mounts it: the files root's, their group fsGroup, the volume's mode.
    folder = pathlib.Path(tempfile.mkdtemp(prefix="edgetunnel-secret-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        secret, state = folder / "ca", folder / "state"
        secret.mkdir()
        state.mkdir(mode=0o700)
        os.chown(state, SECRET_GROUP, SECRET_GROUP)
        for name in ("ca.crt", "ca.key"):
            shutil.copy(c.pki / name, secret / name)
            os.chown(secret / name, 0, security["fsGroup"])
            (secret / name).chmod(volume["secret"]["defaultMode"])
        secret.chmod(0o755)
        before = {p.name: (p.read_bytes(), p.stat().st_mode) for p in secret.iterdir()}
        config.update(caDir=str(secret), pkiDir=str(state), stateDir=str(state), serverCount=1)
        for key in ("leaseNamespace", "addressService", "checkNodeObjects", "joinStateNamespace"):
            config.pop(key, None)  # the Kubernetes API is not here
        (folder / "server.yaml").write_text(yaml.safe_dump(config))
        os.chown(folder / "server.yaml", 0, 0)
        c.server = c.spawn([
            "setpriv", "--reuid", security["runAsUser"], "--regid", security["runAsGroup"], "--groups",
            security["fsGroup"], "--inh-caps=-all", "--bounding-set=-all", "--", BIN / "edge-tunnel-server",
            "--config", folder / "server.yaml", "--bind-address", "127.0.0.1", "--tunnel-port", c.ports["tunnel"],
            "--secure-port", c.ports["secure"], "--meta-port", c.ports["meta"], "--insecure-port",
            c.ports["insecure"]], "server")
        wait_until(lambda: http_get(c.meta_url("/readyz"))[0] == 200, 20, "the server ready from the Secret's CA")
        assert (state / "server.crt").exists()
        token = run(BIN / "edgetunnel", "token", "create", "--pki-dir", state,
                    "--node-cidr", "127.0.0.0/8").stdout.strip()
        for path in state.iterdir():
            os.chown(path, SECRET_GROUP, SECRET_GROUP)
        meta = free_port()
        c.spawn([BIN / "edge-tunnel-agent", "--node-name", "edge-1", "--node-ip", "127.0.0.1", "--server-address",
                 f"127.0.0.1:{c.ports['tunnel']}", "--pki-dir", c.tmp / "agent-edge-1", "--meta-port", meta,
                 "--bootstrap-token", token, "--ca-cert-hash", c.ca_hash], "agent-edge-1")
        wait_until(lambda: http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200, 20, "the agent joined")
        issuer = run("openssl", "verify", "-CAfile", secret / "ca.crt", c.tmp / "agent-edge-1" / "agent.crt")
        assert issuer.stdout.strip().endswith(": OK"), issuer.stdout
        c.server.stop()
        assert {p.name: (p.read_bytes(), p.stat().st_mode) for p in secret.iterdir()} == before
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# The server re-reads nodes.json every two seconds and refuses a revoked node's connections at once (SECURITY.md). It
# closes a connection 200 ms after its REFUSED ("a refused connection ... closed 200 ms later", SECURITY.md's table).
REREAD_S, CLOSE_AFTER_REFUSED_S = 2.0, 0.2
SCHEDULING_SLACK_S = 0.1  # a timer of a busy 2-core machine's event loop may fire this much late


def revoke_and_watch(c, node, start_at=None):
    """A raw agent of `node` holds a registered tunnel; `edgetunnel node revoke` runs (from `start_at`, wall clock).
    Returns the wall-clock times of the start of the command, of nodes.json's write (its mtime: the revocation is
    in force from then), of the REFUSED the tunnel gets, and of its end."""
    _, tls = registered(c, node, version=2)
    while start_at is not None and time.time() < start_at:
        time.sleep(0.001)
    started = time.time()
    run(BIN / "edgetunnel", "node", "revoke", "--pki-dir", c.pki, node)
    written = (c.pki / "nodes.json").stat().st_mtime_ns / 1e9
    refused = closed = None
    tls.settimeout(5)
    try:
        while True:
            frame_type, _, payload = read_frame(tls)
            if frame_type == REFUSED:
                refused = time.time()
                assert "revoked" in json.loads(payload)["reason"], payload
            elif frame_type == PING:
                tls.sendall(frame(PONG, 0, payload))
    except (ConnectionError, ssl.SSLError, OSError):
        closed = time.time()
    tls.close()
    assert refused is not None and closed is not None, (refused, closed)
    return started, written, refused, closed


def test_a_revoked_nodes_live_tunnel_is_refused_within_two_seconds_and_closed_200_ms_later(cluster):
    """SECURITY.md, "Identity": a revoked node's live connections are "closed within two seconds (the server re-reads
    nodes.json every two seconds ...)". Measured from nodes.json's write by `edgetunnel node revoke` to the REFUSED a
    raw agent's registered tunnel gets, and to the connection's end. The revocations are timed to be written just
    after one of the server's re-reads, the worst moment: the REFUSED then comes almost two seconds later, and the
    connection ends 200 ms after it. So the REFUSED holds the documented two seconds; the close takes up to 2.2 s
    (measured 2.09-2.13 s), which the sentence does not allow: see issue 29's report."""
    c = cluster
    c.start_server()
    started, written, refused, _ = revoke_and_watch(c, "edge-0")
    latency, tick = written - started, refused  # the command's start-to-write time; a re-read's moment
    results = []
    for index in range(1, 3):
        # The write aimed 80 ms after a re-read at least a second ahead (the re-reads are 2 s apart).
        after = tick + REREAD_S * (int((time.time() - tick + 1.0) / REREAD_S) + 1)
        started, written, refused, closed = revoke_and_watch(c, f"edge-{index}", start_at=after + 0.08 - latency)
        latency, tick = written - started, refused
        results.append((written - after, refused - written, closed - written))
    print("revocations written after a re-read by / REFUSED / closed: "
          + ", ".join(f"{w:+.3f}/{r:.3f}/{e:.3f} s" for w, r, e in results))
    for _, refused_after, closed_after in results:
        assert refused_after <= REREAD_S + SCHEDULING_SLACK_S, results
        assert closed_after - refused_after <= CLOSE_AFTER_REFUSED_S + SCHEDULING_SLACK_S, results
    # The worst moment was hit: a revocation written just after a re-read waited for the next one.
    assert max(refused_after for _, refused_after, _ in results) >= 1.5, results
