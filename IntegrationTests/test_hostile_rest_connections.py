"""Hostile peers that come back, played for SCENARIO_SECONDS (12 s; 30 s in a long run) while the victim keeps
working (see support/hostile.py for the harness and its four assertions): a peer repeating what was refused (logged
once, renewing only once registered), a stolen agent certificate that never registers, and an agent that
reconnects after a GOAWAY. The thirty-second mix of joins, renewals, revocation, stream limits and bodies is in
test_hostile_rest.py."""
import hashlib
import json
import socket
import ssl
import struct
import time

from conftest import BIN, run
from edge_service import blob_sha256
from support.harness import Cluster, FakeServer, frame, http_get, read_frame
from support.hostile import (ATTACKER_SOURCE, at_least, csr_for, fd_count, frames_until_closed, hello, hostile_scenario,
                             limit_hits)


# Seconds within which the agent closes a tunnel retired by a GOAWAY once its last stream has ended: it does so at
# once; the bound is well under its keepalive timeout (9 s), so a close by keepalive cannot pass for it.
RETIRED_CLOSE_BOUND = 3


def test_a_peer_repeating_what_was_refused_is_logged_once_and_renews_only_once_registered(tmp_path):
    """One write may carry a frame many times over. A HELLO as another node, repeated 100 times, is refused once
    and logged once; RENEW before HELLO gets no certificate; 200 RENEWs on a registered tunnel get one
    certificate, one log line and 199 counts in the metric; 50 REFUSED frames from an agent close its tunnel
    after one log line; a GOAWAY from an agent without streams closes its tunnel."""
    c = Cluster(tmp_path)
    try:
        c.start_server()
        issued = tmp_path / "issued"
        run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", c.pki, "--name", "edge-1",
            "--org", "edge-tunnel:agents", "--out-dir", issued)
        csr = csr_for(tmp_path, "edge-1")
        renew = frame(16, 0, json.dumps({"csrPEM": csr}).encode())

        def connect():
            raw = socket.create_connection(("127.0.0.1", c.ports["tunnel"]), timeout=10)
            return c.tls_context(issued / "edge-1.crt", issued / "edge-1.key").wrap_socket(raw)

        with connect() as tls:
            tls.sendall(hello("edge-2") * 100)
            seen = frames_until_closed(tls)
        assert [t for t, _ in seen] == [15], seen
        with connect() as tls:
            tls.sendall(renew)
            seen = frames_until_closed(tls)
        assert [t for t, _ in seen] == [15] and b"RENEW before HELLO" in seen[0][1], seen
        with connect() as tls:
            tls.sendall(hello("edge-1"))
            assert read_frame(tls)[0] == 2
            tls.sendall(renew * 200)
            tls.settimeout(3)
            renewed = 0
            try:
                while True:
                    frame_type, _, payload = read_frame(tls)
                    renewed += frame_type == 17
                    if frame_type == 10:
                        tls.sendall(frame(11, 0, payload))
            except (socket.timeout, ConnectionError, ssl.SSLError, OSError):
                pass
            assert renewed == 1
            tls.sendall(frame(15, 0, json.dumps({"reason": "going away"}).encode()) * 50)
            assert all(t != 17 for t, _ in frames_until_closed(tls))  # closed by the server after the first
        # HELLO then GOAWAY left a connection outside every registration limit for as long as it answered PINGs:
        # a draining connection with no streams is closed at once.
        with connect() as tls:
            tls.sendall(hello("edge-1"))
            assert read_frame(tls)[0] == 2
            tls.sendall(frame(12, 0, json.dumps({"reason": "draining"}).encode()))
            frames_until_closed(tls, seconds=5)  # fails if the drained connection without streams stays open
        time.sleep(0.5)
        log = c.server.text()
        assert log.count("registration refused") == 2, log  # the 100 HELLOs' one line, and RENEW before HELLO
        assert log.count("certificate renewal refused: asked again within") == 1, log
        assert limit_hits(c, "renew_rate") == 199
        assert log.count("agent closed the tunnel: going away") == 1, log
    finally:
        c.close()


def test_a_stolen_agent_certificate_cannot_hold_connections_without_registering_for_thirty_seconds(tmp_path):
    """edge-1's real certificate, from another address, completes TLS handshakes as fast as it can and never sends
    HELLO. Until its HELLO is accepted a connection stays in the listener's gate: past 256 from one source the
    rest are closed at once (they used to leave the gate at the handshake and each lived for the 5 s
    registration deadline, thousands at a time), and the victim agent and its callers are not shut out."""
    c = Cluster(tmp_path)
    try:
        c.start_server()
        c.victim_port = c.start_edge_service()
        c.victim = c.start_agent("edge-2", "--allow", f"127.0.0.1:{c.victim_port}")
        issued = tmp_path / "issued"
        run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", c.pki, "--name", "edge-1",
            "--org", "edge-tunnel:agents", "--out-dir", issued)
        context = c.tls_context(issued / "edge-1.crt", issued / "edge-1.key")
        pid = c.server.popen.pid

        def attack(stop):
            held, peak_open, handshakes, refused = [], 0, 0, 0
            base = fd_count(pid)
            while not stop.is_set():
                raw = socket.create_connection(("127.0.0.1", c.ports["tunnel"]), timeout=5,
                                               source_address=(ATTACKER_SOURCE, 0))
                try:
                    held.append(context.wrap_socket(raw))
                    handshakes += 1
                except (ConnectionError, ssl.SSLError, OSError):
                    refused += 1  # closed by the gate before or during the handshake
                    raw.close()
                if len(held) % 50 == 0:
                    peak_open = max(peak_open, fd_count(pid) - base)
                    held = [s for s in held if not closed(s)]
            for s in held:
                s.close()
            return peak_open, handshakes, refused

        peak_open, handshakes, refused = hostile_scenario(c, attack)
        print(f"attacker: {handshakes} handshakes, {refused} closed in the gate, server held at most {peak_open} more")
        assert handshakes + refused >= at_least(1000), (handshakes, refused)
        # 256 per source may wait for HELLO, a few more are in flight between the accept and the gate's close.
        assert peak_open <= 256 + 32, peak_open
        metrics = http_get(c.meta_url("/metrics"))[1]
        assert 'edge_tunnel_server_connections_rejected_total{port="tunnel",reason="source_limit"}' in metrics
        assert [a["nodeName"] for a in c.agents()] == ["edge-2"]
    finally:
        c.close()


def closed(sock):
    """Whether the server has closed `sock` (EOF or reset), without blocking."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except (ConnectionError, ssl.SSLError, OSError):
        return True
    finally:
        sock.setblocking(True)


def test_after_a_goaway_the_agent_reconnects_and_new_streams_reach_it(tmp_path):
    """When a tunnel's stream ids run out the server sends GOAWAY "stream ids exhausted: reconnect" (the mux's side
    is `TunnelMuxHostilePeerTests.whenStreamIDsRunOutTheServerSaysGoAwayInsteadOf503Forever`). The node must not
    answer 503 forever: the agent dials a new tunnel at once, a stream open across the GOAWAY finishes byte-exact
    on the old one, which the agent then closes, and an OPEN on the new tunnel is answered. Played with a fake
    server holding the real serving certificate. The fake answers every PING on the old tunnel, so the agent's
    keepalive (9 s) cannot be what closes it: the agent must say GOAWAY and close it itself, within
    RETIRED_CLOSE_BOUND of its last stream ending (an agent that leaks retired tunnels keeps it open)."""
    c = Cluster(tmp_path)
    try:
        port = c.start_edge_service()
        fake = FakeServer.replacing(c, "edge-1", "--allow", f"127.0.0.1:{port}", timeout=15)
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}", join=False, wait=False, pki=tmp_path / "agent-edge-1")

        old = fake.accept()
        old.sendall(frame(3, 1, struct.pack(">I", 1 << 20) + f"127.0.0.1:{port}".encode()))
        assert fake.next_for(old, 1)[0] == 4  # OPEN_OK: a stream open across the GOAWAY
        old.sendall(frame(12, 0, json.dumps({"reason": "stream ids exhausted: reconnect"}).encode()))
        started = time.monotonic()
        new = fake.accept()
        redialed_after = time.monotonic() - started
        new.sendall(frame(3, 1, struct.pack(">I", 1 << 20) + f"127.0.0.1:{port}".encode()))
        assert fake.next_for(new, 1)[0] == 4, "an OPEN on the new tunnel was not answered"
        # The old stream still finishes, byte-exact, and then the old tunnel is closed by the agent.
        old.sendall(frame(6, 1, b"GET /blob/262144 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        data = b""
        while True:
            frame_type, payload = fake.next_for(old, 1)
            if frame_type == 6:
                data += payload
            elif frame_type in (8, 9):
                break
        old.sendall(frame(8, 1, b""))
        stream_ended = time.monotonic()
        assert hashlib.sha256(data.split(b"\r\n\r\n", 1)[1]).hexdigest() == blob_sha256(262144)
        # The retired tunnel: PINGs answered (its keepalive is satisfied), so only the agent's retirement closes it.
        goaways, how = [], None
        while how is None:
            left = stream_ended + RETIRED_CLOSE_BOUND - time.monotonic()
            if left <= 0:
                break
            old.settimeout(left)
            try:
                frame_type, _, payload = read_frame(old)
            except socket.timeout:
                break
            except (ConnectionError, ssl.SSLError, OSError) as error:
                how = f"{type(error).__name__}: {error}"
                break
            if frame_type == 10:
                old.sendall(frame(11, 0, payload))
            elif frame_type == 12:
                goaways.append(json.loads(payload).get("reason"))
        closed_after = time.monotonic() - stream_ended
        assert how is not None, (f"the agent kept the retired tunnel open {closed_after:.1f} s after its last stream "
                                 f"ended, PINGs answered (GOAWAYs it sent: {goaways})")
        assert goaways == ["the agent retired this tunnel"], (goaways, how)
        assert redialed_after < 5, redialed_after
        new.close()
        old.close()
        fake.close()
    finally:
        c.close()
