"""Hostile agents and callers against a real server's stream limits (issue: hostile peers): streams per caller and
per agent, the buffer budget of a tunnel and of the process, an agent that never answers OPENs, and one answering
with a bogus status.

Each scenario plays the attacker for SCENARIO_SECONDS (12 s in `scripts/test`, 30 s in a long run) with real
certificates and raw frames, while a real agent (`edge-2`) keeps serving byte-exact downloads to a caller from
another source address, and asserts that the server stays up, its RSS stays under a stated bound, and its file
descriptors return to the baseline once the attacker has gone. Connections that never register, handshake or read
are in test_hostile_peers.py.
"""
import json
import socket
import ssl

from conftest import BIN, run
from support.harness import Cluster, frame, http_get, read_frame, wait_until
from support.hostile import SCENARIO_SECONDS, at_least, attacker_tunnel, hello, hostile_scenario, limit_hits
from support.hostile import lab  # noqa: F401  (a fixture)


def connect_status(c, target, cert=None, key=None):
    """A CONNECT through the secure port; returns (status line, socket) — the socket is left open."""
    return c.connect_stream(target, cert=cert, key=key, timeout=30)


def test_streams_per_caller_per_agent_and_the_buffer_budget_are_limited(tmp_path):
    """Each limit answers with a status and a reason and counts in edge_tunnel_server_limit_hits_total; other
    callers and streams go on."""
    c = Cluster(tmp_path)
    held = []
    try:
        c.start_server("--max-streams-per-caller", "3", "--max-streams-per-agent", "5", "--max-buffered-mib", "6")
        port = c.start_edge_service()
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}")
        run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", c.pki, "--name", "operator-2")
        other = (c.pki / "operator-2.crt", c.pki / "operator-2.key")
        for _ in range(3):
            status, sock = connect_status(c, f"edge-1:{port}")
            assert status == "HTTP/1.1 200 Connection established", status
            held.append(sock)
        status, sock = connect_status(c, f"edge-1:{port}")
        assert status == "HTTP/1.1 429 Too Many Requests", status
        assert b"caller certificate operator has 3 streams open, its limit" in sock.recv(4096)
        assert limit_hits(c, "streams_per_caller") == 1
        # Another caller is not affected, up to the agent's limit of 5 streams.
        for _ in range(2):
            status, sock = connect_status(c, f"edge-1:{port}", *other)
            assert status == "HTTP/1.1 200 Connection established", status
            held.append(sock)
        status, sock = connect_status(c, f"edge-1:{port}", *other)
        assert status == "HTTP/1.1 503 Service Unavailable", status
        assert b"the agent has 5 streams open, its limit" in sock.recv(4096)
        assert limit_hits(c, "streams_per_agent") == 1
        # Five 1 MiB windows are granted; the sixth MiB is the last the budget holds for a stream.
        for sock in held:
            sock.close()
        held.clear()
        wait_until(lambda: c.agents()[0]["streams"] == 0, 10, "the streams to close")
        budget = [line for line in http_get(c.meta_url("/metrics"))[1].splitlines()
                  if line.startswith("edge_tunnel_server_window_budget_bytes")]
        assert budget == ["edge_tunnel_server_window_budget_bytes 0.0"], budget
    finally:
        for sock in held:
            sock.close()
        c.close()


def test_the_process_buffer_budget_shrinks_windows_then_refuses_streams_past_it(tmp_path):
    """With a 2 MiB budget the first stream gets a large window from the extra quarter, the next ones the 16 KiB
    minimum; only when not even that fits is a stream refused (503), and a closed stream makes room again."""
    c = Cluster(tmp_path)
    held = []
    try:
        c.start_server("--max-buffered-mib", "2")
        port = c.start_edge_service()
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}")
        while len(held) < 200:
            status, sock = connect_status(c, f"edge-1:{port}")
            if status != "HTTP/1.1 200 Connection established":
                break
            held.append(sock)
        assert status == "HTTP/1.1 503 Service Unavailable", status
        assert b"buffer budget is exhausted" in sock.recv(4096)
        # 512 KiB + 16 KiB for the first, 16 KiB for each of the others: 96 streams in 2 MiB.
        assert len(held) == 96, len(held)
        assert limit_hits(c, "buffer_budget") == 1
        held.pop().close()
        wait_until(lambda: c.agents()[0]["streams"] == 95, 10, "a stream to close")
        assert c.curl(f"http://edge-1:{port}/hello", check=True).stdout == "hello from the edge\n"
    finally:
        for sock in held:
            sock.close()
        c.close()


def test_an_agent_that_never_answers_opens_cannot_hold_callers_or_memory(lab):
    """A registered edge-1 that reads OPENs and never answers: at most --max-pending-opens-per-agent (1024)
    wait for it, the rest are refused at once (503), the waiting ones get 504 after the dial timeout, and the
    streams are reclaimed. The attacker counts the opens waiting on it as the server sends them: each OPEN adds
    one, each RST the server sends for one (its caller gone, or its dial timeout) takes it back; the count reaches
    1,024 and never more."""
    opens = {"pending": 0, "most": 0, "opened": 0, "cancelled": 0, "timed_out": 0}

    def attack(stop):
        refused = 0
        waiting = set()  # stream ids the server opened and has not cancelled
        with attacker_tunnel(lab) as tls:
            tls.sendall(hello("edge-1"))
            assert read_frame(tls)[0] == 2
            tls.settimeout(1)
            callers = []
            while not stop.is_set():
                for _ in range(200):
                    s = socket.create_connection(("127.0.0.1", lab.ports["insecure"]), timeout=30)
                    s.sendall(b"CONNECT edge-1:10250 HTTP/1.1\r\nHost: edge-1\r\n\r\n")
                    callers.append(s)
                try:  # read (and never answer) the OPENs, answer PINGs so the server keeps the tunnel
                    while True:
                        frame_type, stream_id, payload = read_frame(tls)
                        if frame_type == 10:
                            tls.sendall(frame(11, 0, payload))
                        elif frame_type == 3:
                            assert stream_id not in waiting, stream_id
                            waiting.add(stream_id)
                            opens["opened"] += 1
                        elif frame_type == 9 and stream_id in waiting:
                            waiting.discard(stream_id)
                            opens["cancelled"] += 1
                        opens["pending"] = len(waiting)
                        opens["most"] = max(opens["most"], len(waiting))
                except (socket.timeout, ssl.SSLError):
                    pass
                for s in list(callers):
                    s.setblocking(False)
                    try:
                        answer = s.recv(4096)
                    except BlockingIOError:
                        continue
                    if answer.startswith(b"HTTP/1.1 503"):
                        assert b"still opening, its limit" in answer, answer
                        refused += 1
                    elif answer:
                        assert answer.startswith(b"HTTP/1.1 504"), answer
                        opens["timed_out"] += 1
                    s.close()
                    callers.remove(s)
                if len(callers) > 2000:
                    break
            for s in callers:
                s.close()
        return refused

    # 200 callers a round: the 1,024 waiting ones are reached after about six rounds, before the first 504s (15 s,
    # the dial timeout); the scenario lasts past them.
    refused = hostile_scenario(lab, attack, max(SCENARIO_SECONDS, 20))
    print(f"opens: {opens}, refused at once: {refused}")
    assert opens["most"] == 1024, opens  # the cap reached, never passed
    assert refused > 0 and limit_hits(lab, "pending_opens") == refused
    # The dial timeout passed: 504s came, and the server cancelled (RST) the opens it gave up.
    assert opens["timed_out"] > 0 and opens["cancelled"] > 0, opens


def test_an_agent_answering_with_a_bogus_status_cannot_stop_the_server(lab):
    """OPEN_FAIL codes are the agent's word: -1 made NIO trap when the server turned it into an HTTP status, and
    200 would have told the caller its CONNECT was established. Both become 502; the reason is shortened."""
    def attack(stop):
        answered = 0
        with attacker_tunnel(lab) as tls:
            tls.sendall(hello("edge-1"))
            assert read_frame(tls)[0] == 2
            while not stop.is_set():
                for code in (-1, 200, 99999, 0):
                    raw = socket.create_connection(("127.0.0.1", lab.ports["insecure"]), timeout=10)
                    raw.sendall(b"CONNECT edge-1:10250 HTTP/1.1\r\nHost: edge-1\r\n\r\n")
                    while True:
                        frame_type, stream_id, payload = read_frame(tls)
                        if frame_type == 10:
                            tls.sendall(frame(11, 0, payload))
                        if frame_type == 3:
                            break
                    tls.sendall(frame(5, stream_id, json.dumps({"code": code, "reason": "x\n" * 50000}).encode()))
                    answer = raw.recv(65536)
                    raw.close()
                    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway"), (code, answer[:100])
                    assert len(answer) < 4096, len(answer)
                    answered += 1
        return answered

    assert hostile_scenario(lab, attack) >= at_least(20)
