"""Claims of the docs about resuming a tunnel that had no test (issue 29, "Claims with no test"), each held to what
the docs say against the real binaries: real TLS (Python's ssl), real agents or raw agents with real certificates,
real callers. Helpers: support/claims.py.

Where a claim lives:
- Resuming (`--resume-grace-seconds 0`, 502 while suspended, what ends suspended streams, GOAWAY/REFUSED, the
  agent's redial, 16 tokens, 2,048 streams): PROTOCOL.md "Resuming a tunnel", OPERATIONS.md, SECURITY.md "Limits";
  `AgentSession(+Hello)`, `AgentRegistry`, `TunnelMux+Resume`, `AgentTunnel`, `EdgeTunnelAgent.keepTunnelUp`.
  (503 while a takeover is under way is a Swift test: `ResumeClaimsTests`, the window is too short to hit from outside.)
The other claims are in test_claims_operations.py (the tunnel port's TLS, `--replica-warmup`, LoadBalancer
hostnames and `--node-objects`, a connection bound to its first node, `--event-loop-threads`) and
test_claims_security.py (64 lookups, the `nodes.json` lock, the CA secret's mode, revocation within two seconds).
"""
import json
import socket
import threading
import time

import pytest

from conftest import BIN, run
from support.claims import (HELLO_OK, OPEN, OPEN_OK, DATA, PING, PONG, GOAWAY, REFUSED, RESUME, registered,
                            stream_through, still_open, server_metric, agent_metric, lose_tunnel_with_a_stream)
from support.claims import cluster  # noqa: F401  (fixture)
from support.harness import FakeServer, connection_end, frame, http_get, read_frame, read_head, recv_exact, wait_until


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
