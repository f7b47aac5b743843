"""The rest of the hostile-peers items, each played for SCENARIO_SECONDS (12 s; 30 s in a long run) while a victim
keeps working (see support/hostile.py for the harness): a node posing as another, callers sending what a parser
must refuse, callers and an agent together trying to grow the server past its limits, and a hostile server against
a real agent."""
import hashlib
import json
import os
import socket
import ssl
import struct
import time

import pytest
from cryptography import x509

from conftest import BIN, run
from edge_service import blob_sha256
from support.harness import Cluster, FakeServer, frame, read_frame, rss_kib, wait_until
from support.hostile import (ATTACKER_SOURCE, RSS_GROWTH_BOUND_MIB, SCENARIO_SECONDS, at_least, attacker_tunnel,
                             csr_for, fd_count, hello, hostile_scenario, limit_hits, refusal)
from support.hostile import lab  # noqa: F401  (a fixture)


def test_a_node_cannot_pose_as_another_for_thirty_seconds(lab, tmp_path):
    """edge-1's real certificate, raw frames: HELLO as edge-2 (the victim), HELLO claiming an IP its certificate
    does not name, RENEW with a CSR for edge-2's name (refused, never signed), and JOIN as edge-2 with a valid shared token. Every one is refused,
    the victim keeps its tunnel (same connection, same IPs) and its streams."""
    token = lab.token()
    victim_before = [a for a in lab.agents() if a["nodeName"] == "edge-2"]
    edge2_csr = csr_for(tmp_path, "edge-2")

    renewed = []  # the names in certificates the RENEWs for edge-2's name brought back: none may come

    def attack(stop):
        counts = {"name": 0, "ip": 0, "renew": 0, "join": 0}
        while not stop.is_set():
            with attacker_tunnel(lab) as tls:
                tls.sendall(hello("edge-2"))
                reason = refusal(tls)
                assert reason and "edge-1" in reason and "edge-2" in reason, reason
                counts["name"] += 1
            with attacker_tunnel(lab) as tls:
                tls.sendall(hello("edge-1", ips=["127.0.0.1"]))
                reason = refusal(tls)
                assert reason and "127.0.0.1" in reason, reason
                counts["ip"] += 1
            with attacker_tunnel(lab) as tls:
                tls.sendall(hello("edge-1"))
                assert read_frame(tls)[0] == 2
                tls.sendall(frame(16, 0, json.dumps({"csrPEM": edge2_csr}).encode()))
                tls.settimeout(3)
                try:
                    while True:
                        frame_type, _, payload = read_frame(tls)
                        if frame_type == 10:
                            tls.sendall(frame(11, 0, payload))
                        if frame_type == 17:  # a CSR naming another node is refused, never signed
                            pem = json.loads(payload)["certificatePEM"].encode()
                            names = x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(
                                x509.NameOID.COMMON_NAME)
                            renewed.append([n.value for n in names])
                except (ConnectionError, ssl.SSLError, OSError):
                    pass
                counts["renew"] += 1
            with attacker_tunnel(lab, cert=False) as tls:
                tls.sendall(frame(13, 0, json.dumps({"token": token, "nodeName": "edge-2", "nodeIPs": [],
                                                     "csrPEM": edge2_csr}).encode()))
                reason = refusal(tls)
                assert reason and ("edge-2" in reason or "too many joins" in reason), reason
                counts["join"] += 1
        return counts

    counts = hostile_scenario(lab, attack)
    assert min(counts.values()) >= at_least(5), counts
    assert renewed == [], f"a RENEW with edge-2's name in its CSR was signed: {renewed}"
    lab.server.expect_log("certificate signing request names node")  # the refusal, with both names
    victim_after = [a for a in lab.agents() if a["nodeName"] == "edge-2"]
    assert victim_after and victim_after[0]["connectedSince"] == victim_before[0]["connectedSince"], (victim_before, victim_after)
    assert victim_after[0]["nodeIPs"] == victim_before[0]["nodeIPs"]
    assert "edge-1" not in [a["nodeName"] for a in lab.agents()]


# What a caller may send that a parser must refuse, and the status it gets.
HOSTILE_HEADS = [
    (b"POST / HTTP/1.1\r\nHost: edge-2\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: edge-2\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"GET / HTTP/1.1\r\nHost: edge-2\r\nX: 1\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: edge-2\r\nHost: edge-1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: edge-2\r\nX: a\x01b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: edge-2\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n", 431),
    (b"GET http://user:pw@edge-2/ HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: " + b"x" * 5000 + b"!\r\n\r\n", 400),
    (b"GET http://no-such-node:80/ HTTP/1.1\r\n\r\n", 502),
    (b"GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\n\r\n", 502),
    (b"CONNECT edge-2:22 HTTP/1.1\r\nHost: edge-2\r\n\r\n", 403),
]


def send_until_refused(sock, pieces):
    """Sends `pieces` until the server has refused: it answers and closes as soon as the parser rejects the head
    (llhttp may do so before the head ends), and what the caller sends after that meets a reset. The answer is
    already in the socket's receive queue, ahead of the reset, for `answer` to read."""
    for piece in pieces:
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return


def answer(sock):
    """Everything the server sends before it closes (bounded by the socket timeout)."""
    data = b""
    while len(data) < 65536:
        try:
            chunk = sock.recv(65536)
        except (ConnectionError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return data


def test_callers_sending_what_a_parser_must_refuse_for_thirty_seconds(lab):
    """From another address, on the insecure port: request smuggling shapes, a bare LF, control characters, two
    Hosts, a head over 64 KiB, credentials in a proxy URL, a Host that echoes 5,000 bytes, absolute-form requests
    to no node and to the metadata address, a CONNECT to a port edge-2 does not allow, and heads sent one byte
    at a time. Each gets its status and a one-line reason; the victim's streams go on."""
    def attack(stop):
        answered = 0
        while not stop.is_set():
            for request, status in HOSTILE_HEADS:
                with socket.create_connection(("127.0.0.1", lab.ports["insecure"]), timeout=10,
                                              source_address=(ATTACKER_SOURCE, 0)) as sock:
                    send_until_refused(sock, [request])
                    data = answer(sock)
                head, _, body = data.partition(b"\r\n\r\n")
                assert head.startswith(f"HTTP/1.1 {status} ".encode()), (request[:80], data[:200])
                assert body.count(b"\n") == 1 and len(body) < 1024, (request[:80], body[:300])
                answered += 1
            # A head dribbled one byte at a time is still routed, and still refused when it smuggles.
            with socket.create_connection(("127.0.0.1", lab.ports["insecure"]), timeout=10,
                                          source_address=(ATTACKER_SOURCE, 0)) as sock:
                send_until_refused(sock, [bytes([byte]) for byte in HOSTILE_HEADS[0][0]])
                assert answer(sock).startswith(b"HTTP/1.1 400 ")
        return answered

    assert hostile_scenario(lab, attack) >= at_least(5 * len(HOSTILE_HEADS))


def test_callers_and_an_agent_together_cannot_grow_the_server_past_its_limits(tmp_path):
    """edge-1 (raw frames) accepts every stream and never reads a byte of it (no WINDOW); callers from another
    address open streams to it and push data as fast as the server takes it. The server holds at most a
    window per stream: the callers are not read past it, and their 16th stream gets 429 (streams per caller).
    The 24 MiB buffer budget gives the first streams large windows and the rest the 16 KiB minimum, so the
    victim's streams still open and its downloads go on."""
    c = Cluster(tmp_path)
    try:
        c.start_server("--max-streams-per-caller", "15", "--max-buffered-mib", "24")
        c.victim_port = c.start_edge_service()
        c.victim = c.start_agent("edge-2", "--allow", f"127.0.0.1:{c.victim_port}")
        for name in ("edge-1", "operator-2", "operator-3"):
            extra = ["--org", "edge-tunnel:agents"] if name == "edge-1" else []
            run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", c.pki, "--name", name, *extra,
                "--out-dir", tmp_path / "issued")
        c.attacker_cert, c.attacker_key = tmp_path / "issued" / "edge-1.crt", tmp_path / "issued" / "edge-1.key"
        callers = [(tmp_path / "issued" / f"{n}.crt", tmp_path / "issued" / f"{n}.key") for n in ("operator-2", "operator-3")]
        statuses = {}

        def attack(stop):
            with attacker_tunnel(c) as agent:
                agent.sendall(hello("edge-1"))
                assert read_frame(agent)[0] == 2
                agent.settimeout(0.05)
                held = []
                for cert, key in callers:
                    for _ in range(20):
                        raw = socket.create_connection(("127.0.0.1", c.ports["secure"]), timeout=10,
                                                       source_address=(ATTACKER_SOURCE, 0))
                        tls = c.tls_context(cert, key).wrap_socket(raw)
                        tls.sendall(b"CONNECT edge-1:10250 HTTP/1.1\r\nHost: edge-1\r\n\r\n")
                        held.append(tls)
                        status = None
                        deadline = time.monotonic() + 10
                        while status is None and time.monotonic() < deadline:
                            try:  # answer the OPEN (and PINGs); DATA is never read into a WINDOW
                                while True:
                                    frame_type, stream_id, payload = read_frame(agent)
                                    if frame_type == 3:
                                        agent.sendall(frame(4, stream_id, struct.pack(">I", 1 << 20)))
                                    elif frame_type == 10:
                                        agent.sendall(frame(11, 0, payload))
                            except (socket.timeout, ssl.SSLError):
                                pass
                            tls.settimeout(0.05)
                            try:
                                status = tls.recv(4096).split(b"\r\n", 1)[0].decode()
                            except (socket.timeout, ssl.SSLError):
                                pass
                        statuses.setdefault(status, 0)
                        statuses[status] += 1
                chunk = os.urandom(64 * 1024)
                while not stop.is_set():  # push into every established stream; the server stops reading them
                    for tls in held:
                        tls.settimeout(0.01)
                        try:
                            tls.sendall(chunk)
                        except (socket.timeout, ssl.SSLError, OSError):
                            pass
                    try:
                        while True:
                            frame_type, _, payload = read_frame(agent)
                            if frame_type == 10:
                                agent.sendall(frame(11, 0, payload))
                    except (socket.timeout, ssl.SSLError):
                        pass
                for tls in held:
                    tls.close()

        hostile_scenario(c, attack)
        assert statuses.get("HTTP/1.1 200 Connection established", 0) == 30, statuses
        assert statuses.get("HTTP/1.1 429 Too Many Requests", 0) == 10, statuses
        assert limit_hits(c, "streams_per_caller") >= 5 and limit_hits(c, "buffer_budget") == 0
    finally:
        c.close()


def test_a_hostile_server_cannot_make_the_agent_dial_out_of_bounds_for_thirty_seconds(tmp_path):
    """A fake server with the real serving certificate asks a real agent, for SCENARIO_SECONDS, for the metadata address
    (plain and IPv4-mapped), a port outside its allow list, a target of 200,000 characters and a malformed one,
    an allowed name that resolves to loopback (refused before any connect),
    while a legitimate stream to the allowed edge service downloads byte-exact each round. The agent refuses
    each with a bounded OPEN_FAIL, its RSS stays bounded and its descriptors return; a reused stream id ends
    the tunnel (a protocol error) and the agent dials again."""
    c = Cluster(tmp_path)
    try:
        port = c.start_edge_service()
        fake = FakeServer.replacing(c, "edge-1", "--allow", f"127.0.0.1:{port}")
        # `127.1` is a name to the allow list (not an address in inet_pton's form) that the resolver turns into
        # 127.0.0.1: the DNS-rebinding case, a name rule whose name leads to loopback, through the real dial path.
        # It is refused before any connect: this listener, which no address rule allows, must never see one
        # (connecting first told a hostile server which loopback ports were open).
        rebound = socket.create_server(("127.0.0.1", 0))
        rebound.setblocking(False)
        renamed = rebound.getsockname()[1]
        agent = c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}", "--allow", f"127.1:{renamed}", join=False,
                              wait=False, pki=tmp_path / "agent-edge-1")

        def download(tls, stream_id):
            tls.sendall(frame(3, stream_id, struct.pack(">I", 1 << 20) + f"127.0.0.1:{port}".encode()))
            assert fake.next_for(tls, stream_id)[0] == 4  # OPEN_OK
            tls.sendall(frame(6, stream_id, b"GET /blob/262144 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
            data = b""
            while True:
                frame_type, payload = fake.next_for(tls, stream_id)
                if frame_type == 6:
                    data += payload
                elif frame_type in (8, 9):  # FIN or RST
                    break
            # Our FIN ends the stream. (Without it the agent keeps the target's socket half-closed, as TCP
            # half-close asks: a server that never finishes streams holds up to the agent's stream limit.)
            tls.sendall(frame(8, stream_id, b""))
            body = data.split(b"\r\n\r\n", 1)[1]
            assert hashlib.sha256(body).hexdigest() == blob_sha256(262144), "the legitimate stream was not byte-exact"

        hostile = [("169.254.169.254:80", b"not on the allow list"), ("[::ffff:169.254.169.254]:80", b"not on the allow list"),
                   ("127.0.0.1:1", b"not on the allow list"), ("/" * 200000, b"is not host:port"),
                   ("edge-1", b"is not host:port"), (f"127.1:{renamed}", b"127.1 resolved to 127.0.0.1")]
        tls = fake.accept("evil")
        pid = agent.popen.pid
        stream_id = 1
        download(tls, stream_id)
        time.sleep(0.5)
        base_fds, base_rss = fd_count(pid), rss_kib(pid)
        peak, rounds, end = base_rss, 0, time.monotonic() + SCENARIO_SECONDS
        while time.monotonic() < end:
            for target, words in hostile:
                stream_id += 2
                tls.sendall(frame(3, stream_id, struct.pack(">I", 1 << 20) + target.encode()))
                frame_type, payload = fake.next_for(tls, stream_id)
                assert frame_type == 5 and words in payload and len(payload) < 8 * 1024, (target[:40], payload[:200])
            stream_id += 2
            download(tls, stream_id)
            rounds += 1
            peak = max(peak, rss_kib(pid))
            assert agent.alive()
        assert rounds >= at_least(10), rounds
        with pytest.raises(BlockingIOError):
            rebound.accept()  # no connection was made to the address the name resolved to
        rebound.close()
        assert (peak - base_rss) / 1024 < RSS_GROWTH_BOUND_MIB, f"agent RSS grew by {(peak - base_rss) / 1024:.0f} MiB"
        wait_until(lambda: fd_count(pid) <= base_fds, 30, f"agent descriptors back to {base_fds}")
        # A reused stream id is a protocol error: the agent ends this tunnel and dials again.
        tls.sendall(frame(3, stream_id, struct.pack(">I", 1 << 20) + f"127.0.0.1:{port}".encode()))
        closed = False
        try:
            while True:
                frame_type, _, payload = read_frame(tls)
                if frame_type == 10:
                    tls.sendall(frame(11, 0, payload))
        except (ConnectionError, ssl.SSLError, OSError):
            closed = True
        assert closed
        tls.close()
        tls = fake.accept("evil")
        download(tls, 1)
        assert agent.alive()
        tls.close()
        fake.close()
    finally:
        c.close()
