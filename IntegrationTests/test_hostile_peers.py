"""Hostile agents, servers and unauthenticated connections against the real binaries (issue: hostile peers): tunnels
that never register or go silent, an oversize node name, a PING flood that never reads, connections that never
handshake, a hostile server and the agent's frames, handshakes without a certificate.

Each scenario plays the attacker for SCENARIO_SECONDS (12 s in `scripts/test`, 30 s in a long run) with real
certificates and raw frames, while a real agent (`edge-2`) keeps serving byte-exact downloads to a caller from
another source address, and asserts that the server stays up, its RSS stays under a stated bound, and its file
descriptors return to the baseline once the attacker has gone. Stream limits, buffer budgets and agents that
answer OPENs wrongly or never are in test_hostile_peers_streams.py.
"""
import contextlib
import json
import math
import socket
import ssl
import struct
import time

from support.harness import Cluster, FakeServer, frame, http_get, read_frame, wait_until
from support.hostile import SCENARIO_SECONDS, attacker_tunnel, frames_until_closed, hello, hostile_scenario, limit_hits
from support.hostile import lab  # noqa: F401  (a fixture)
from support.peers import TCP_CLOSE, TCP_CLOSE_WAIT, tcp_state


def test_a_tunnel_that_never_registers_or_goes_silent_is_closed(lab):
    """Keepalive as the server applies it, played by a peer with a real agent certificate: a tunnel that never
    says HELLO is closed after one keepalive interval (5 s); a registered tunnel that goes quiet is PINGed, and
    one that stays silent for the keepalive timeout (20 s) is closed and its node unregistered."""
    started = time.monotonic()
    with attacker_tunnel(lab) as tls:
        tls.settimeout(15)
        assert tls.recv(1) == b""  # closed by the server, no frame
    assert 3 <= time.monotonic() - started <= 12, time.monotonic() - started
    lab.server.expect_log("did not register within 5s", timeout=5)

    with attacker_tunnel(lab) as tls:
        tls.sendall(hello("edge-1"))
        tls.settimeout(10)
        assert read_frame(tls)[0] == 2  # HELLO_OK
        quiet_since = time.monotonic()
        assert read_frame(tls)[0] == 10  # the server PINGs a quiet tunnel ...
        assert time.monotonic() - quiet_since <= 11
        wait_until(lambda: "edge-1" in http_get(f"http://127.0.0.1:{lab.ports['meta']}/v1/agents")[1], 5, "edge-1 registered")
        # ... and, never answered, closes it after 20 s of silence: PINGs until the close, nothing else.
        seen = frames_until_closed(tls, seconds=30, answer_pings=False)
        assert all(frame_type == 10 for frame_type, _ in seen), seen
        assert 18 <= time.monotonic() - quiet_since <= 30, time.monotonic() - quiet_since
    lab.server.expect_log("agent silent for 20s, closing its tunnel", timeout=5)
    wait_until(lambda: "edge-1" not in http_get(f"http://127.0.0.1:{lab.ports['meta']}/v1/agents")[1], 5, "edge-1 gone")


def test_an_echoed_oversize_node_name_does_not_stop_the_server(lab):
    """HELLO and JOIN with node names of 15,000 slashes (JSON escaping doubles them) and of 140,000: the server
    answers with a bounded reason or closes that connection, and keeps serving everyone."""
    token = lab.token()

    def attack(stop):
        refusals = 0
        while not stop.is_set():
            with attacker_tunnel(lab) as tls:
                tls.sendall(hello("/" * 15000))
                frame_type, _, payload = read_frame(tls)
                assert frame_type == 15, frame_type
                reason = json.loads(payload)["reason"]
                assert len(payload) < 8 * 1024 and "edge-1" in reason and "more)" in reason, reason[:200]
                refusals += 1
            with attacker_tunnel(lab) as tls:  # over the limit for an unregistered peer: closed, no answer
                tls.sendall(hello("/" * 140000))
                assert frames_until_closed(tls, seconds=10) == []
            with attacker_tunnel(lab, cert=False) as tls:
                tls.sendall(frame(13, 0, json.dumps({"token": token, "nodeName": "/" * 15000, "csrPEM": "x"}).encode()))
                frame_type, _, payload = read_frame(tls)
                assert frame_type == 15 and len(payload) < 8 * 1024, (frame_type, payload[:200])
                reason = json.loads(payload)["reason"]
                # Past 50 joins in 10 s from one address, the join rate limit answers first.
                joins[reason.startswith("join refused: too many joins")] += 1
                assert "invalid node name" in reason or "too many joins" in reason, reason[:200]
            with attacker_tunnel(lab, cert=False) as tls:  # a join frame over the unregistered limit: closed
                tls.sendall(frame(13, 0, json.dumps({"token": token, "nodeName": "/" * 140000, "csrPEM": "x"}).encode()))
                assert frames_until_closed(tls, seconds=10) == []
        return refusals

    joins = {False: 0, True: 0}
    # At least two of the join limiter's 10-s windows (it counts from a window's first join), so that one fills.
    seconds = max(SCENARIO_SECONDS, 21)
    assert hostile_scenario(lab, attack, seconds) >= math.ceil(10 * seconds / 30)
    assert joins[False] >= 1 and joins[True] >= 1, joins
    lab.server.expect_log("registration refused")
    assert limit_hits(lab, "frame_size") >= 1  # the 140,000-slash HELLOs, over the 16 KiB before registration
    refusals = [line for line in lab.server.text().splitlines() if "registration refused" in line]
    assert refusals and all(len(line) < 2000 for line in refusals), max(map(len, refusals))


def test_an_agent_that_floods_pings_and_never_reads_is_cut_off(lab):
    """A registered agent sends 8-byte PINGs as fast as it can and never reads the PONGs: the server closes it
    instead of queueing PONGs (it grew by 4.8 GB in 15 s before), at the 33rd PING in a burst (keepalive needs
    one every 3 s). Until PINGs had a rate, the flood ran until its PONGs filled the socket, and the victim's
    downloads waited up to 9.4 s behind those reads. A PING with a 256 KiB payload is a protocol error: a REFUSED
    naming it, then the close. Cut off means closed (a send that fails because the server reset or closed the
    connection): a server that merely stopped reading, so that the sender's writes block, fails the test."""
    ping = frame(10, 0, b"12345678") * 4096

    def attack(stop):
        floods, cut_off = 0, 0
        while not stop.is_set():
            with attacker_tunnel(lab) as tls:
                tls.sendall(hello("edge-1"))
                assert read_frame(tls)[0] == 2  # HELLO_OK
                tls.settimeout(10)
                floods += 1
                try:
                    while not stop.is_set():
                        tls.sendall(ping)
                except socket.timeout:
                    raise AssertionError("the server stopped reading the PING flood for 10 s without closing the "
                                         "tunnel") from None
                except (ConnectionError, ssl.SSLError, OSError) as error:
                    # The send failed: the server's FIN or RST has arrived (an SSL error alone is not proof).
                    state = tcp_state(tls)
                    assert state in (TCP_CLOSE, TCP_CLOSE_WAIT), (state, error)
                    cut_off += 1
            with attacker_tunnel(lab) as tls:
                tls.sendall(hello("edge-1"))
                assert read_frame(tls)[0] == 2
                tls.sendall(frame(10, 0, b"x" * (256 * 1024)))
                while True:  # PONG-less: a REFUSED naming the PING, then the close
                    frame_type, _, payload = read_frame(tls)
                    if frame_type == 15:
                        assert b"PING with 262144 payload bytes" in payload, payload
                        break
                assert [t for t, _ in frames_until_closed(tls) if t != 10] == []
        return floods, cut_off

    floods, cut_off = hostile_scenario(lab, attack)
    # Every flood was cut off, except perhaps the one the scenario's end stopped.
    assert cut_off >= 1 and cut_off >= floods - 1, (floods, cut_off)
    lab.server.expect_log("PINGs faster than 8.0 a second")
    assert limit_hits(lab, "ping_rate") >= 1  # an operator sees the cut-offs


def test_connections_that_never_handshake_are_closed_and_capped(lab):
    """1,500 TCP connections to the secure port that never send a ClientHello: past 256 from one source they are
    closed at once, the rest when the 10 s handshake deadline passes; a caller from another address and the
    agents are not shut out meanwhile. The same on the tunnel port, and on the meta and insecure ports (no request
    head)."""
    ports = ("secure", "tunnel", "meta", "insecure")

    def attack(stop):
        held = []
        opened = time.monotonic()
        for port in ports:
            for _ in range(1500):
                s = socket.socket()
                s.settimeout(5)
                s.connect(("127.0.0.1", lab.ports[port]))
                held.append(s)

        def closed(s):
            """EOF or a reset; a plain port's 408 before its close is read past."""
            s.setblocking(False)
            try:
                while s.recv(65536):
                    pass
                return True
            except BlockingIOError:
                return False
            except OSError:
                return True

        beyond_limit = len(ports) * (1500 - 256)
        wait_until(lambda: sum(closed(s) for s in held) >= beyond_limit, 5, "connections beyond the limit closed")
        at_once = sum(closed(s) for s in held)
        wait_until(lambda: all(closed(s) for s in held), 25, "every silent connection to be closed")
        waited = time.monotonic() - opened
        for s in held:
            s.close()
        while not stop.is_set():
            time.sleep(0.1)
        return at_once, waited

    # The victim downloads until the admitted connections' deadlines have passed (12 s), whatever the length.
    at_once, waited = hostile_scenario(lab, attack, max(SCENARIO_SECONDS, 15))
    assert at_once <= len(ports) * (1500 - 256) + 20, f"{at_once} closed at once: the admitted ones should wait for the deadline"
    # The admitted ones are each port's first 256: the secure port's wait 10 s from the start, the meta port's 12 s
    # (a plain port's deadline is the 10 s head timeout and 2 s more) from a moment later.
    assert 9.5 <= waited <= 25, waited
    metrics = http_get(lab.meta_url("/metrics"))[1]
    for port in ports:
        assert f'edge_tunnel_server_connections_rejected_total{{port="{port}",reason="source_limit"}}' in metrics
        if port != "insecure":  # there the 10 s head timeout answers 408 and closes before the gate's deadline
            assert f'edge_tunnel_server_connections_rejected_total{{port="{port}",reason="handshake_timeout"}}' in metrics
    assert 'edge_tunnel_server_unauthenticated_connections{port="secure"} 0' in metrics
    assert [a["nodeName"] for a in lab.agents()] == ["edge-2"]


def test_a_hostile_server_cannot_make_the_agent_build_an_oversize_frame(tmp_path):
    """A fake server with a real serving certificate answers the agent's HELLO and sends an OPEN whose target is
    200,000 characters: the agent refuses it with a bounded OPEN_FAIL and keeps its tunnel."""
    c = Cluster(tmp_path)
    try:
        fake = FakeServer.replacing(c, "edge-1")
        agent = c.start_agent("edge-1", join=False, wait=False, pki=tmp_path / "agent-edge-1")
        with fake.accept("evil") as tls:
            tls.sendall(frame(3, 1, struct.pack(">I", 1 << 20) + b"/" * 200000))
            while True:
                frame_type, stream_id, payload = read_frame(tls)
                if frame_type == 10:
                    tls.sendall(frame(11, 0, payload))
                    continue
                break
            assert (frame_type, stream_id) == (5, 1), frame_type  # OPEN_FAIL on stream 1
            assert len(payload) < 8 * 1024 and b"is not host:port" in payload, payload[:200]
            time.sleep(1)
            assert agent.alive()
            tls.sendall(frame(10, 0, b"pingpong"))
            while True:
                frame_type, _, payload = read_frame(tls)
                if frame_type == 11:
                    assert payload == b"pingpong"
                    break
        fake.close()
    finally:
        c.close()


def test_handshakes_without_a_certificate_stay_counted_until_they_join(tmp_path):
    """On the tunnel port a TLS handshake without a client certificate may only join: it stays in the per-source
    count and under the deadline until it ends, so silent certificate-less connections cannot pile up."""
    c = Cluster(tmp_path)
    held = []
    try:
        c.start_server("--max-pending-connections-per-source", "20", "--handshake-timeout", "4s")
        context = c.tls_context()
        for _ in range(20):
            raw = socket.create_connection(("127.0.0.1", c.ports["tunnel"]), timeout=10)
            held.append(context.wrap_socket(raw))  # handshake done, no certificate, nothing sent
        extra = socket.create_connection(("127.0.0.1", c.ports["tunnel"]), timeout=10)
        extra.settimeout(5)
        assert extra.recv(1) == b"", "a 21st connection from the same source was admitted"
        extra.close()
        started = time.monotonic()
        for tls in held:
            tls.settimeout(10)
            with contextlib.suppress(OSError):  # an EOF, or a reset: either way closed by the deadline
                assert tls.recv(1) == b""
        assert 2 <= time.monotonic() - started <= 8
        assert limit_free(c)
    finally:
        for tls in held:
            tls.close()
        c.close()


def limit_free(c):
    """The tunnel port admits again once the held connections are gone."""
    agent = c.start_agent("edge-1")
    return agent.alive()
