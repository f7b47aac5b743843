"""Memory adversaries (issue 25): peers that send one byte at a time, callers and targets that stop reading, and
callers that write one byte per TLS record into resumable tunnels. A `ByteBuffer` slice keeps its whole read
buffer alive, so before the fix each byte kept 32 KiB to 300 KiB: the server grew by 545-770 MiB and the agent by
517 MiB in these very scenarios. Each scenario samples the process's RSS from a baseline taken once its windows
are full and holds it to the bound of docs/SECURITY.md ("The most memory peers can make us hold"), while another
node's stream stays byte-exact. Also played: callers of the insecure port (10264) that stop reading, and one-byte
writes in both directions at once on the same streams. A resumable tunnel lost while its streams are full and 300
streams holding a few hundred bytes each are in test_memory_adversary_streams.py; helpers in support/memory.py.
"""
import json
import socket
import struct
import threading
import time

import pytest

from support.harness import Cluster, FakeServer, frame, read_frame, read_head, rss_kib, wait_until
from support.hostile import attacker_tunnel, hello, victim_download
from support.memory import (GROWTH_BOUND_MIB, ONE_BYTE_FRAMES, sample_growth, Credit, stuck_target, stopped_caller,
                            answer_open, resumable_hello, drain_frames, server_metric, attacker_certificate)


# What the hostile agent answers a request Host-routed on the insecure port with: the port relays the node's answer
# as it comes, so the head is the agent's to send, and any bytes may follow it.
ANSWER_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("frontend", ["unix-socket", "secure-port", "insecure-port"])
def test_one_byte_frames_from_a_hostile_agent_to_a_caller_that_stopped_reading(tmp_path, frontend):
    """Finding 3: a stolen agent certificate accepts a caller's stream; the caller stops reading. After a bulk fill
    within the granted credit, 800 one-byte DATA frames, each in its own TLS record. With --max-buffered-mib 16
    the server grew by 545 MiB before (1,083 MiB here, on the Unix socket); now by no more than the bound, and
    edge-2's stream stays byte-exact. Over TLS (10263) the caller's bytes are encrypted into buffers of their own
    as they are written, so the same attack held little before too: kept as the neighbour case. On the insecure
    port (10264) a GET Host-routed to edge-1 is answered by the hostile agent itself (an answer head, then the
    bulk and the one-byte frames), relayed as plain bytes as on the Unix socket: the same bound.
    Fails when the server's RSS grows by GROWTH_BOUND_MIB or more (bytes kept as slices pinning their TLS read
    buffers), when the server dies, or when edge-2's download is not byte-exact."""
    c = Cluster(tmp_path)
    try:
        uds = tmp_path / "callers.sock"
        c.start_server("--max-buffered-mib", "16", "--uds-path", uds)
        c.victim_port = c.start_edge_service()
        c.victim = c.start_agent("edge-2", "--allow", f"127.0.0.1:{c.victim_port}")
        attacker_certificate(c, tmp_path)
        pid = c.server.popen.pid
        with attacker_tunnel(c) as agent:
            agent.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each frame its own segment and read
            agent.sendall(hello("edge-1"))
            assert read_frame(agent)[0] == 2
            callers, credits = [], []
            for _ in range(2):
                caller = stopped_caller(c, frontend, uds)
                stream_id, window = answer_open(agent)
                if frontend == "insecure-port":
                    agent.sendall(frame(6, stream_id, ANSWER_HEAD))
                    window -= len(ANSWER_HEAD)
                assert read_head(caller).startswith(b"HTTP/1.1 200"), "the caller's request was not answered"
                callers.append(caller)  # and never read again
                credits.append(Credit(agent, stream_id, window))
            for credit in credits:
                credit.fill(keep=ONE_BYTE_FRAMES + 64)
            victim_download(c)
            time.sleep(0.5)
            base = rss_kib(pid)

            def during(sample):
                for credit in credits:
                    credit.one_byte_frames(ONE_BYTE_FRAMES, sample)
                victim_download(c)  # another node's stream, byte-exact meanwhile

            growth = sample_growth(pid, base, during)
            assert c.server.alive()
            assert growth < GROWTH_BOUND_MIB, f"server RSS grew by {growth:.0f} MiB for {2 * ONE_BYTE_FRAMES} bytes"
            for caller in callers:
                caller.close()
    finally:
        c.close()


def test_one_byte_frames_to_an_agents_target_that_stopped_reading(tmp_path):
    """Finding 2: a target stops reading; its kernel buffers fill; then one-byte DATA frames arrive for it, each in
    a TLS record of its own (played by a server with the real serving certificate). The agent grew by 517 MiB after
    1,792 bytes before: about 295 KiB per byte, past its container limit of 160 Mi."""
    c = Cluster(tmp_path)
    try:
        listener, held = stuck_target()
        port = listener.getsockname()[1]
        fake = FakeServer.replacing(c, "edge-1", "--allow", f"127.0.0.1:{port}")
        agent = c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}", join=False, wait=False,
                              pki=tmp_path / "agent-edge-1")
        tls = fake.accept("evil")
        credits = []
        for stream_id in (1, 3):
            tls.sendall(frame(3, stream_id, struct.pack(">I", 1 << 20) + f"127.0.0.1:{port}".encode()))
            frame_type, payload = fake.next_for(tls, stream_id)
            assert frame_type == 4, payload  # OPEN_OK, with the agent's window
            credits.append(Credit(tls, stream_id, struct.unpack(">I", payload[:4])[0]))
        for credit in credits:
            credit.fill(keep=ONE_BYTE_FRAMES + 64)
        time.sleep(0.5)
        pid = agent.popen.pid
        base = rss_kib(pid)

        def during(sample):
            for credit in credits:
                credit.one_byte_frames(ONE_BYTE_FRAMES, sample)

        growth = sample_growth(pid, base, during)
        assert agent.alive()
        assert growth < GROWTH_BOUND_MIB, f"agent RSS grew by {growth:.0f} MiB for {2 * ONE_BYTE_FRAMES} bytes"
        tls.close()
        fake.close()
        listener.close()
        for conn in held:
            conn.close()
    finally:
        c.close()


def test_callers_writing_one_byte_per_record_into_resumable_tunnels(tmp_path):
    """Finding 1: a caller opens 16 CONNECT streams through 10263 to a real agent's sink and writes one byte per
    write. The server keeps each byte to send again until the agent credits it (in quarters of its window): before,
    each kept the caller's whole TLS read buffer, 770 MiB after 24,576 bytes while the retained-bytes gauge read
    24,576. Now the RSS follows the gauge."""
    c = Cluster(tmp_path)
    try:
        sink = socket.create_server(("127.0.0.1", 0))
        port = sink.getsockname()[1]

        def drain():
            while True:
                try:
                    conn, _ = sink.accept()
                except OSError:
                    return
                threading.Thread(target=lambda s=conn: [None for _ in iter(lambda: s.recv(65536), b"")],
                                 daemon=True).start()

        threading.Thread(target=drain, daemon=True).start()
        c.start_server()
        c.victim_port = c.start_edge_service()
        c.victim = c.start_agent("edge-2", "--allow", f"127.0.0.1:{c.victim_port}")
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}", ips=("127.0.0.5",))
        pid = c.server.popen.pid
        streams = []
        for _ in range(16):
            status, tls = c.connect_stream(f"edge-1:{port}")
            assert status.startswith("HTTP/1.1 200"), status
            tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            streams.append(tls)
        victim_download(c)
        time.sleep(0.5)
        base = rss_kib(pid)
        rounds = 24576 // len(streams)

        def during(sample):
            for i in range(rounds):
                for tls in streams:
                    tls.sendall(b"z")
                time.sleep(0.001)
                if i % 200 == 0:
                    sample()
            time.sleep(0.5)
            victim_download(c)

        growth = sample_growth(pid, base, during)

        def retained():
            return server_metric(c, "edge_tunnel_server_retained_bytes")

        kept = retained()
        assert kept is not None and kept <= rounds * len(streams), kept
        assert growth < GROWTH_BOUND_MIB, f"server RSS grew by {growth:.0f} MiB for {rounds * len(streams)} bytes"
        for tls in streams:
            tls.close()
        wait_until(lambda: retained() == 0, 20, "retained bytes given back once the streams ended")
        sink.close()
    finally:
        c.close()


def test_one_byte_writes_both_ways_at_once_on_the_same_streams(tmp_path):
    """A stolen agent certificate (version 3: a resumable tunnel) accepts two streams, one from a caller on the
    Unix socket and one from a caller on 10263, and both callers stop reading. After a bulk fill of the server's
    windows towards them, on the same streams at once: the agent sends 800 one-byte DATA frames each (each in a
    TLS record of its own), and each caller writes 800 bytes one per write (on 10263 one per TLS record), which
    the agent reads and never credits, so the server keeps them to send again. Both kinds of kept bytes grow side
    by side, piece by piece: before the fix each pinned a whole read buffer.

    Bound: from the baseline taken with the windows full, the server's RSS grows by less than GROWTH_BOUND_MIB; the
    retained gauge reads exactly the 1,600 bytes the callers wrote, and 0 once the callers have gone; edge-2's
    download stays byte-exact. Fails when either direction's one-byte pieces pin their read buffers, when the
    server's accounting of what it keeps is off, or when closing the callers does not give it back."""
    c = Cluster(tmp_path)
    try:
        uds = tmp_path / "callers.sock"
        c.start_server("--max-buffered-mib", "16", "--uds-path", uds)
        c.victim_port = c.start_edge_service()
        c.victim = c.start_agent("edge-2", "--allow", f"127.0.0.1:{c.victim_port}")
        attacker_certificate(c, tmp_path)
        pid = c.server.popen.pid

        def retained():
            return server_metric(c, "edge_tunnel_server_retained_bytes")

        with attacker_tunnel(c) as agent:
            agent.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            agent.sendall(resumable_hello("edge-1"))
            frame_type, _, payload = read_frame(agent)
            assert frame_type == 2 and json.loads(payload).get("resumeToken"), payload
            callers, credits = [], []
            for frontend in ("unix-socket", "secure-port"):
                caller = stopped_caller(c, frontend, uds)
                stream_id, window = answer_open(agent)
                assert read_head(caller).startswith(b"HTTP/1.1 200"), "the caller's CONNECT was not answered"
                if frontend == "secure-port":
                    caller.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one record, one segment
                callers.append(caller)  # never read again
                credits.append(Credit(agent, stream_id, window))
            for credit in credits:
                credit.fill(keep=ONE_BYTE_FRAMES + 64)
            victim_download(c)
            time.sleep(0.5)
            base = rss_kib(pid)

            def during(sample):
                for i in range(ONE_BYTE_FRAMES):
                    for caller, credit in zip(callers, credits):
                        agent.sendall(frame(6, credit.stream_id, b"y"))
                        credit.available -= 1
                        caller.sendall(b"z")
                    time.sleep(0.002)
                    if i % 50 == 0:
                        drain_frames(agent, credits)  # PINGs answered; the callers' bytes counted at the end
                    if i % 100 == 0:
                        sample()
                time.sleep(0.5)
                victim_download(c)  # another node's stream, byte-exact meanwhile

            growth = sample_growth(pid, base, during)
            assert c.server.alive()
            assert growth < GROWTH_BOUND_MIB, \
                f"server RSS grew by {growth:.0f} MiB for {2 * ONE_BYTE_FRAMES} bytes each way"
            wait_until(lambda: drain_frames(agent, credits) >= 0 and retained() == len(callers) * ONE_BYTE_FRAMES,
                       5, f"the callers' {len(callers) * ONE_BYTE_FRAMES} bytes kept to send again")
            for caller in callers:
                caller.close()
            wait_until(lambda: drain_frames(agent, credits, wait=0.1) >= 0 and retained() == 0, 10,
                       "the kept bytes given back once the callers have gone")
    finally:
        c.close()
