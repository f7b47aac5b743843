"""The hostile-peers items that had focused tests only, played together for SCENARIO_SECONDS (12 s; 30 s in a long
run) while the victim keeps working (see support/hostile.py for the harness and its four assertions): token
guessing, a renewal flood, a node revoked while it holds a tunnel, an agent at its stream limit, and callers posting
bodies and forward-proxy requests. Peers that come back (repeating what was refused, a stolen certificate, a
reconnect after a GOAWAY) are in test_hostile_rest_connections.py. What stays focused only is listed in
docs/SECURITY.md (start-up checks and unit-level cases)."""
import hashlib
import json
import os
import queue
import socket
import ssl
import struct
import threading
import time

from conftest import BIN, run
from support.harness import Cluster, frame, http_get, read_frame, read_head
from support.hostile import (ATTACKER_SOURCE, SCENARIO_SECONDS, at_least, csr_for, hello, hostile_scenario, limit_hits,
                             refusal)

STREAMS_PER_AGENT = 6
REVOKE_AFTER = SCENARIO_SECONDS / 3  # seconds into the scenario (10 s in a 30-s one)


class RawAgent:
    """A registered agent played with raw frames on its own thread (one thread does all of the socket's I/O):
    it answers PINGs, accepts every OPEN, answers a FIN with a FIN, and counts the certificates RENEW brings."""

    def __init__(self, c, cert, key, node):
        raw = socket.create_connection(("127.0.0.1", c.ports["tunnel"]), timeout=10)
        self.tls = c.tls_context(cert, key).wrap_socket(raw)
        self.tls.sendall(hello(node))
        assert read_frame(self.tls)[0] == 2, f"{node} did not register"
        self.outbox, self.renewed, self.opened, self.closed = queue.Queue(), [], 0, False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        self.tls.settimeout(0.05)
        pending = b""  # a frame cut by the read timeout is completed by the next reads
        try:
            while not self.stop.is_set():
                while not self.outbox.empty():
                    self.tls.sendall(self.outbox.get())
                try:
                    chunk = self.tls.recv(65536)
                except (socket.timeout, ssl.SSLWantReadError):
                    continue
                if not chunk:
                    raise ConnectionError("closed by the server")
                pending += chunk
                while len(pending) >= 12:
                    frame_type, _, _, stream_id, length = struct.unpack(">BBHII", pending[:12])
                    if len(pending) < 12 + length:
                        break
                    payload, pending = pending[12:12 + length], pending[12 + length:]
                    self.handle(frame_type, stream_id, payload)
        except (ConnectionError, ssl.SSLError, OSError):
            self.closed = True

    def handle(self, frame_type, stream_id, payload):
        if frame_type == 10:
            self.tls.sendall(frame(11, 0, payload))
        elif frame_type == 3:
            self.opened += 1
            self.tls.sendall(frame(4, stream_id, (1 << 20).to_bytes(4, "big")))
        elif frame_type == 8:
            self.tls.sendall(frame(8, stream_id, b""))
        elif frame_type == 17:
            self.renewed.append(json.loads(payload)["certificatePEM"])

    def close(self):
        self.stop.set()
        self.thread.join(10)
        self.tls.close()


def join_answer(c, token):
    """The REFUSED reason a JOIN with `token` gets, on a connection without a certificate."""
    raw = socket.create_connection(("127.0.0.1", c.ports["tunnel"]), timeout=10)
    with c.tls_context().wrap_socket(raw) as tls:
        tls.sendall(frame(13, 0, json.dumps({"token": token, "nodeName": "edge-9", "nodeIPs": [],
                                             "csrPEM": c.edge9_csr}).encode()))
        return refusal(tls)


def post_in_pieces(c, body):
    """A 1 MiB body Host-routed on the insecure port, head and body in many writes; returns the echoed SHA-256."""
    with socket.create_connection(("127.0.0.1", c.ports["insecure"]), timeout=20,
                                  source_address=(ATTACKER_SOURCE, 0)) as sock:
        head = (f"POST /sha256 HTTP/1.1\r\nHost: edge-2:{c.victim_port}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        sock.sendall(head[:9])
        sock.sendall(head[9:])
        for start in range(0, len(body), 4096):
            sock.sendall(body[start:start + 4096])
        status = read_head(sock).split(b"\r\n", 1)[0]
        assert status == b"HTTP/1.1 200 OK", status
        return sock.recv(1024).decode().strip()


def absolute_form_get(c):
    with socket.create_connection(("127.0.0.1", c.ports["insecure"]), timeout=20,
                                  source_address=(ATTACKER_SOURCE, 0)) as sock:
        sock.sendall(f"GET http://edge-2:{c.victim_port}/hello HTTP/1.1\r\nHost: edge-2:{c.victim_port}\r\n"
                     "Proxy-Connection: keep-alive\r\n\r\n".encode())
        head = read_head(sock)
        body = sock.recv(1024)
        return head.split(b"\r\n", 1)[0], body


def test_joins_renewals_revocation_stream_limits_and_bodies_together_for_thirty_seconds(tmp_path):
    """For SCENARIO_SECONDS, together, while the victim downloads:
    - JOINs with an unknown token id and with a wrong secret get one and the same answer;
    - a registered agent (edge-4) asks for a new certificate again and again: one signature per 10 s;
    - edge-3, a real agent holding a tunnel, is revoked a third of the way in: its tunnel closes within seconds,
      and each of its redials is refused;
    - edge-1 accepts every stream: a caller's streams past the agent's limit get 503 with the reason, round
      after round, and the victim's streams are not counted against it;
    - a caller posts 1 MiB bodies Host-routed in 4 KiB writes (byte-exact at the edge) and sends absolute-form
      requests (forwarded in origin form)."""
    c = Cluster(tmp_path)
    raw_agents = []
    try:
        c.start_server("--max-streams-per-agent", str(STREAMS_PER_AGENT))
        c.victim_port = c.start_edge_service()
        c.victim = c.start_agent("edge-2", "--allow", f"127.0.0.1:{c.victim_port}")
        revoked = c.start_agent("edge-3", ips=("127.0.0.3",))
        issued = tmp_path / "issued"
        for name in ("edge-1", "edge-4", "operator-2"):
            extra = [] if name.startswith("operator") else ["--org", "edge-tunnel:agents"]
            run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", c.pki, "--name", name, *extra,
                "--out-dir", issued)
        c.edge9_csr = csr_for(tmp_path, "edge-9")
        edge4_csr = csr_for(tmp_path, "edge-4")
        token_id, secret = c.token().split(".")
        caller = (issued / "operator-2.crt", issued / "operator-2.key")
        body = os.urandom(1 << 20)
        tally = {"join_pairs": 0, "renews_sent": 0, "stream_rounds": 0, "refused_503": 0, "bodies": 0,
                 "absolute": 0}

        def attack(stop):
            started = time.monotonic()
            revoked_at = closed_after = None
            streamer = RawAgent(c, issued / "edge-1.crt", issued / "edge-1.key", "edge-1")
            renewer = RawAgent(c, issued / "edge-4.crt", issued / "edge-4.key", "edge-4")
            raw_agents.extend([streamer, renewer])
            while not stop.is_set():
                # Token guessing: which half of the token was wrong is not told.
                unknown, wrong = join_answer(c, f"zzzzzz.{secret}"), join_answer(c, f"{token_id}.0000000000000000")
                assert unknown and wrong, (unknown, wrong)
                if "too many joins" not in unknown + wrong:
                    assert unknown == wrong, (unknown, wrong)
                    tally["join_pairs"] += 1
                # A renewal flood on one connection.
                for _ in range(3):
                    renewer.outbox.put(frame(16, 0, json.dumps({"csrPEM": edge4_csr}).encode()))
                    tally["renews_sent"] += 1
                # Streams to an agent at its limit; they close again before the next round.
                held, statuses = [], []
                for _ in range(STREAMS_PER_AGENT + 2):
                    status, sock = c.connect_stream("edge-1:10250", *caller, timeout=10)
                    statuses.append(status)
                    if status.startswith("HTTP/1.1 503"):
                        reason = sock.recv(4096)
                        assert f"the agent has {STREAMS_PER_AGENT} streams open, its limit".encode() in reason, reason
                    held.append(sock)
                assert statuses.count("HTTP/1.1 200 Connection established") == STREAMS_PER_AGENT, statuses
                tally["refused_503"] += statuses.count("HTTP/1.1 503 Service Unavailable")
                for sock in held:
                    sock.close()
                deadline = time.monotonic() + 10
                busy = lambda: any(a["nodeName"] == "edge-1" and a["streams"] for a in c.agents())  # noqa: E731
                while time.monotonic() < deadline and busy():
                    time.sleep(0.05)
                tally["stream_rounds"] += 1
                # Bodies and forward-proxy requests from the attacker's address.
                assert post_in_pieces(c, body) == hashlib.sha256(body).hexdigest()
                tally["bodies"] += 1
                status, answer = absolute_form_get(c)
                assert status == b"HTTP/1.1 200 OK" and answer == b"hello from the edge\n", (status, answer)
                tally["absolute"] += 1
                # Revocation of a live node, once.
                now = time.monotonic()
                if revoked_at is None and now - started >= REVOKE_AFTER:
                    run(BIN / "edgetunnel", "node", "revoke", "--pki-dir", c.pki, "edge-3")
                    revoked_at = time.monotonic()
                if revoked_at is not None and closed_after is None \
                        and http_get(f"http://127.0.0.1:{revoked.meta}/readyz")[0] == 503:
                    closed_after = time.monotonic() - revoked_at
            # The scenario may end between the revocation and the round that would see the tunnel closed: look on
            # until the bound asserted below has passed.
            while revoked_at is not None and closed_after is None and time.monotonic() < revoked_at + 8:
                if http_get(f"http://127.0.0.1:{revoked.meta}/readyz")[0] == 503:
                    closed_after = time.monotonic() - revoked_at
                else:
                    time.sleep(0.1)
            streamer.close()
            renewer.close()
            return revoked_at, closed_after, streamer.closed or renewer.closed, len(renewer.renewed), \
                time.monotonic() - started

        revoked_at, closed_after, cut_off, renewed, seconds = hostile_scenario(c, attack)
        print(f"rounds: {tally}, certificates renewed: {renewed}, revoked tunnel closed after {closed_after} s")
        assert not cut_off, "a raw agent lost its tunnel during the scenario"
        assert min(tally["join_pairs"], tally["stream_rounds"], tally["bodies"]) >= at_least(5), tally
        assert tally["refused_503"] == 2 * tally["stream_rounds"], tally
        assert limit_hits(c, "streams_per_agent") == tally["refused_503"]
        # One signature per node per 10 s, however many were asked for.
        assert 1 <= renewed <= seconds // 10 + 1, (renewed, tally["renews_sent"])
        assert limit_hits(c, "renew_rate") >= tally["renews_sent"] - renewed - 3
        assert revoked_at is not None and closed_after is not None and closed_after < 8, closed_after
        assert "edge-3" not in [a["nodeName"] for a in c.agents()]
        c.server.expect_log("tunnel connection refused: node edge-3 is revoked")
        c.server.expect_log("has a wrong secret")  # the operator is told which, the prober is not
    finally:
        for agent in raw_agents:
            agent.close()
        c.close()
