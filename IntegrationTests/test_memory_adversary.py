"""Memory adversaries (issue 25): peers that send one byte at a time, callers and targets that stop reading, and
callers that write one byte per TLS record into resumable tunnels. A `ByteBuffer` slice keeps its whole read
buffer alive, so before the fix each byte kept 32 KiB to 300 KiB: the server grew by 545-770 MiB and the agent by
517 MiB in these very scenarios. Each scenario samples the process's RSS from a baseline taken once its windows
are full and holds it to the bound of docs/SECURITY.md ("The most memory peers can make us hold"), while another
node's stream stays byte-exact. Also played: callers of the insecure port (10264) that stop reading, a resumable
tunnel lost while its streams are full (held for the resume grace, then given back), 300 streams holding a few
hundred bytes each, and one-byte writes in both directions at once on the same streams.
"""
import json
import resource
import select
import socket
import struct
import threading
import time

import pytest

from conftest import BIN, run
from support.harness import Cluster, FakeServer, frame, http_get, read_frame, read_head, rss_kib, wait_until
from support.hostile import attacker_tunnel, hello, victim_download

# What one byte kept may cost, by docs/SECURITY.md: at most twice itself plus 512 bytes per kept buffer, and small
# pieces are gathered. So 800 one-byte frames may cost a few KiB; the bound below leaves room for the allocator's
# noise and the process's own work (logs, metrics), and sits far below what the bug cost (hundreds of MiB).
GROWTH_BOUND_MIB = 24
ONE_BYTE_FRAMES = 800


def sample_growth(pid, base_kib, during):
    """Runs `during(sample)`; `sample()` records the RSS. Returns the peak growth over `base_kib`, in MiB."""
    peak = [base_kib]

    def sample():
        peak[0] = max(peak[0], rss_kib(pid))

    during(sample)
    sample()
    growth = (peak[0] - base_kib) / 1024
    print(f"RSS {base_kib / 1024:.0f} MiB at the baseline, peak growth {growth:.1f} MiB")  # shown with -s
    return growth


class Credit:
    """A raw peer's send credit on one stream: the window it was granted, plus WINDOW increments, minus DATA sent."""

    def __init__(self, sock, stream_id, window):
        self.sock, self.stream_id, self.available = sock, stream_id, window

    def read_frames(self, timeout):
        """Reads frames for up to `timeout` s: credit from WINDOWs, PINGs answered. True when credit came."""
        self.sock.settimeout(timeout)
        got = False
        try:
            while True:
                frame_type, sid, payload = read_frame(self.sock)
                if frame_type == 10:
                    self.sock.sendall(frame(11, 0, payload))
                elif frame_type == 7 and sid == self.stream_id:
                    self.available += struct.unpack(">I", payload)[0]
                    got = True
                    self.sock.settimeout(0.05)
        except (socket.timeout, TimeoutError):
            pass
        return got

    def fill(self, keep):
        """Sends DATA while credit comes back, keeping `keep` bytes of credit: when no credit came for a second, the
        receiver's socket is full and it holds what it could not write."""
        chunk = b"x" * (64 * 1024)
        self.filled = 0
        while True:
            while self.available > keep:
                piece = chunk[:self.available - keep]
                self.sock.sendall(frame(6, self.stream_id, piece))
                self.available -= len(piece)
                self.filled += len(piece)
            if not self.read_frames(1.0):
                break
        assert self.available >= keep, self.available
        print(f"stream {self.stream_id}: {self.filled} bytes filled, {self.available} of credit left")

    def one_byte_frames(self, count, sample):
        """`count` DATA frames of one byte, each in a TLS record and a read of its own (spaced a little)."""
        for i in range(count):
            self.sock.sendall(frame(6, self.stream_id, b"y"))
            self.available -= 1
            time.sleep(0.002)
            if i % 100 == 0:
                sample()
        time.sleep(0.5)


def stuck_target():
    """A TCP listener that accepts and never reads (a small receive buffer): a target that stopped reading."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return listener, held


# What the hostile agent answers a request Host-routed on the insecure port with: the port relays the node's answer
# as it comes, so the head is the agent's to send, and any bytes may follow it.
ANSWER_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"


def stopped_caller(c, frontend, uds, target="edge-1:10250"):
    """A caller on `frontend` with a small receive buffer, its request for edge-1 sent (it will never read again):
    CONNECT `target` on the Unix socket and the secure port; on the insecure port (10264) a `kubectl logs -f`
    style GET Host-routed to edge-1 (its default port there, 10255), answered by the node itself."""
    if frontend == "unix-socket":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(str(uds))
    else:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", c.ports["insecure" if frontend == "insecure-port" else "secure"]))
        if frontend == "insecure-port":
            sock.sendall(b"GET /containerLogs/default/web/app?follow=true HTTP/1.1\r\nHost: edge-1\r\n\r\n")
            return sock
        sock = c.tls_context(c.cert, c.key).wrap_socket(sock)
    host = target.rsplit(":", 1)[0]
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def answer_open(agent, window=1 << 20):
    """As a raw agent: the next OPEN (PINGs answered meanwhile), accepted with `window`. Returns the stream id and
    the send credit the server granted."""
    while True:
        frame_type, stream_id, payload = read_frame(agent)
        if frame_type == 10:
            agent.sendall(frame(11, 0, payload))
        elif frame_type == 3:
            break
    agent.sendall(frame(4, stream_id, struct.pack(">I", window)))
    return stream_id, struct.unpack(">I", payload[:4])[0]


def resumable_hello(node):
    """A version-3 HELLO: the server makes the tunnel resumable (it keeps what it sends until it is credited)."""
    return frame(1, 0, json.dumps({"version": 3, "nodeName": node, "nodeIPs": [], "capabilities": []}).encode())


def drain_frames(agent, credits, wait=0.0):
    """As a raw agent: handles the frames that have arrived (waiting up to `wait` s for the first): PINGs answered,
    WINDOWs added to their stream's credit. Returns the DATA bytes read. A frame that has begun to arrive is read
    whole (no timeout can cut one in half, unlike `Credit.read_frames`)."""
    by_id = {credit.stream_id: credit for credit in credits}
    agent.settimeout(10)
    data = 0
    while agent.pending() or select.select([agent], [], [], wait)[0]:
        wait = 0
        frame_type, stream_id, payload = read_frame(agent)
        if frame_type == 10:
            agent.sendall(frame(11, 0, payload))
        elif frame_type == 7 and stream_id in by_id:
            by_id[stream_id].available += struct.unpack(">I", payload)[0]
        elif frame_type == 6:
            data += len(payload)
    return data


def server_metric(c, name):
    """A value of the server's /metrics (`name` with its labels, if any); None when it is not there."""
    for line in http_get(c.meta_url("/metrics"))[1].splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.split()[-1])
    return None


def attacker_certificate(c, tmp_path):
    """An agent certificate for edge-1, as a thief of that node's key would hold it."""
    run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", c.pki, "--name", "edge-1",
        "--org", "edge-tunnel:agents", "--out-dir", tmp_path / "attacker")
    c.attacker_cert, c.attacker_key = tmp_path / "attacker" / "edge-1.crt", tmp_path / "attacker" / "edge-1.key"


def read_to_end(sock, seconds=10):
    """Reads a caller's socket until the server ends it (EOF or reset); the bytes read. Fails when it stays open."""
    sock.settimeout(seconds)
    total = 0
    try:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return total
            total += len(data)
    except ConnectionResetError:
        return total
    except (socket.timeout, TimeoutError):
        raise AssertionError(f"the caller's stream was not ended within {seconds}s ({total} bytes read)")


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


def push_until_full(sock, cap=8 << 20):
    """Writes to a caller's socket without blocking until the kernel takes no more (at most `cap` bytes): what a
    caller can push into a stream whose socket the server does not read. Returns the bytes the kernel took."""
    sock.setblocking(False)
    pushed = 0
    try:
        while pushed < cap:
            pushed += sock.send(b"v" * 65536)
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(10)
    return pushed


def agent_receives(agent, credits, count, seconds=10):
    """As a raw agent: reads frames until `count` DATA bytes have come (PINGs answered, credit counted)."""
    deadline = time.monotonic() + seconds
    got = 0
    while got < count:
        assert time.monotonic() < deadline, f"{got} of {count} bytes reached the agent in {seconds}s"
        got += drain_frames(agent, credits, wait=0.5)
    assert got == count, f"{got} bytes reached the agent, {count} were sent"


RESUME_GRACE = 3


def test_a_resumable_tunnel_lost_while_its_streams_are_full(tmp_path):
    """A stolen agent certificate says HELLO as version 3, so its tunnel is resumable, and accepts three streams
    from callers on the Unix socket that stop reading. Both directions are filled to their windows: each caller
    sends 512 KiB (the agent's whole window) that the agent reads and never credits, so the server keeps all of
    it to send again; the agent fills the server's window towards each caller, which the server holds. Then one
    byte per write and per frame both ways (400 each way per stream), so that what the server holds is in small
    pieces, and the tunnel's TCP connection is cut with a reset. The server suspends the streams for the resume
    grace (--resume-grace-seconds 3) while the callers push on into sockets it must not read.

    Bound: from the baseline taken with the windows full, the server's RSS grows by less than GROWTH_BOUND_MIB
    through the one-byte pieces, the suspension and the second after the grace; from the warm-up baseline (streams
    open, nothing held) by less than the formula's 2.3 × (bytes held) + 0.5 MiB × S + GROWTH_BOUND_MIB. After the
    grace every stream is reset (each caller's socket ends), the retained-bytes gauge is back at 0, the window
    budget back at its value before the streams, no tunnel suspended. Fails when suspended streams pin their read
    buffers or copy what they keep, when their callers' sockets are read while suspended (a caller pushes more
    than 2 MiB), when the grace's end leaks the streams or their kept bytes, or when edge-2's download breaks."""
    streams, sent, one_byte = 3, 512 * 1024, 400
    c = Cluster(tmp_path)
    try:
        uds = tmp_path / "callers.sock"
        c.start_server("--max-buffered-mib", "16", "--uds-path", uds, "--resume-grace-seconds", str(RESUME_GRACE))
        c.victim_port = c.start_edge_service()
        c.victim = c.start_agent("edge-2", "--allow", f"127.0.0.1:{c.victim_port}")
        attacker_certificate(c, tmp_path)
        pid = c.server.popen.pid

        def retained():
            return server_metric(c, "edge_tunnel_server_retained_bytes")

        victim_download(c)
        budget_before = server_metric(c, "edge_tunnel_server_window_budget_bytes")
        with attacker_tunnel(c) as agent:
            agent.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            agent.sendall(resumable_hello("edge-1"))
            frame_type, _, payload = read_frame(agent)
            assert frame_type == 2, payload
            ok = json.loads(payload)
            assert ok.get("resumeToken") and ok.get("resumeGraceSeconds") == RESUME_GRACE, ok
            callers, credits = [], []
            for _ in range(streams):
                caller = stopped_caller(c, "unix-socket", uds)
                # The agent's window: exactly what its caller will send, so each stream ends up at its credit.
                stream_id, window = answer_open(agent, window=sent + one_byte)
                assert read_head(caller).startswith(b"HTTP/1.1 200"), "the caller's CONNECT was not answered"
                callers.append(caller)  # never read again until the streams end
                credits.append(Credit(agent, stream_id, window))
            victim_download(c)
            time.sleep(0.5)
            warm = rss_kib(pid)
            # Callers → agent: the agent reads every byte and credits none, so the server keeps them all.
            writer = threading.Thread(target=lambda: [caller.sendall(b"u" * sent) for caller in callers], daemon=True)
            writer.start()
            agent_receives(agent, credits, streams * sent, seconds=20)
            writer.join(10)
            wait_until(lambda: retained() == streams * sent, 5, "the callers' bytes kept to send again")
            # Agent → callers: the server's windows, held for callers that do not read.
            for credit in credits:
                credit.fill(keep=one_byte + 64)
            held = streams * (sent + one_byte) + sum(credit.filled for credit in credits) + streams * one_byte
            victim_download(c)
            time.sleep(0.5)
            base = rss_kib(pid)
            pushed = []

            def during(sample):
                for i in range(one_byte):
                    for caller, credit in zip(callers, credits):
                        agent.sendall(frame(6, credit.stream_id, b"y"))
                        credit.available -= 1
                        caller.sendall(b"z")
                    time.sleep(0.002)
                    if i % 50 == 0:
                        sample()
                agent_receives(agent, credits, streams * one_byte)
                wait_until(lambda: retained() == streams * (sent + one_byte), 5, "every caller byte kept")
                time.sleep(0.3)
                sample()
                agent.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                agent.close()  # the tunnel's TCP connection is cut: a reset, no close_notify
                c.server.expect_log(f"agent connection lost: its {streams} streams wait {RESUME_GRACE}s")
                cut = time.monotonic()
                assert server_metric(c, "edge_tunnel_server_suspended_tunnels") == 1
                for caller in callers:
                    pushed.append(push_until_full(caller))
                victim_download(c)  # another node's stream, byte-exact meanwhile
                while time.monotonic() < cut + RESUME_GRACE:
                    sample()
                    time.sleep(0.1)
                c.server.expect_log("the agent's suspended streams ended", timeout=5)
                for caller in callers:
                    read_to_end(caller)  # reset: the caller's stream ends
                wait_until(lambda: retained() == 0, 5, "the kept bytes given back after the grace")
                for _ in range(10):  # and the RSS does not keep growing
                    sample()
                    time.sleep(0.1)
                victim_download(c)

            growth = sample_growth(pid, base, during)
        from_warm = growth + (base - warm) / 1024
        warm_bound = 2.3 * held / (1 << 20) + 0.5 * streams + GROWTH_BOUND_MIB
        print(f"held {held} bytes; from the warm-up baseline {from_warm:.1f} MiB (bound {warm_bound:.1f}); "
              f"pushed while suspended {pushed}")
        assert c.server.alive()
        assert growth < GROWTH_BOUND_MIB, f"server RSS grew by {growth:.0f} MiB holding a lost tunnel's full streams"
        assert from_warm < warm_bound, f"server RSS grew by {from_warm:.0f} MiB for {held} bytes held"
        assert max(pushed) < 2 << 20, f"suspended streams' callers pushed {pushed} bytes: their sockets were read"
        assert server_metric(c, "edge_tunnel_server_suspended_tunnels") == 0
        assert server_metric(c, 'edge_tunnel_server_tunnel_resumes_total{outcome="ended"}') == 1
        wait_until(lambda: server_metric(c, "edge_tunnel_server_window_budget_bytes") == budget_before, 5,
                   f"the window budget back at {budget_before}")
        for caller in callers:
            caller.close()
    finally:
        c.close()


# What the many-streams test allows beyond the formula's per-stream and byte terms: the allocator's and the
# process's own noise (300 caller connections come and go through one event loop).
MANY_STREAMS_SLACK_MIB = 8


def test_many_streams_each_holding_a_little(tmp_path):
    """300 callers on the Unix socket CONNECT to a target of edge-1 (a real agent) that accepts and never reads,
    and stop reading. Each sends 256 bytes, then 64 bytes one per write, round-robin, so that each arrives in a
    read of its own: the resumable tunnel keeps every byte until the agent credits it (in quarters of a window it
    never reaches), so the server holds 320 bytes per stream, 96,000 in all, in 300 × 65 reads.

    Bound: from the warm-up baseline (no stream open), the server's RSS grows by less than the formula's terms for
    them, 6.2 KiB × S + 2.3 × the bytes held, plus MANY_STREAMS_SLACK_MIB (about 10 MiB in all); the retained gauge
    reads exactly the bytes sent. Once the callers close (the target still stuck), the stream gauge and the
    retained gauge return to their baselines. Fails when a kept byte pins its read buffer (1-2 KiB each here:
    with KeptBytes and StreamGlue's gathering turned off the server grew by 23 MiB), when a stream costs much more
    than the formula says, or when the streams or their bytes outlive their callers."""
    streams, bulk, rounds = 300, 256, 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    c = Cluster(tmp_path)
    try:
        listener, held = stuck_target()
        port = listener.getsockname()[1]
        uds = tmp_path / "callers.sock"
        c.start_server("--uds-path", uds)
        c.victim_port = c.start_edge_service()
        c.victim = c.start_agent("edge-2", "--allow", f"127.0.0.1:{c.victim_port}")
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}", ips=("127.0.0.5",))
        pid = c.server.popen.pid

        def retained():
            return server_metric(c, "edge_tunnel_server_retained_bytes")

        def open_streams():
            return server_metric(c, "edge_tunnel_server_streams")

        victim_download(c)
        time.sleep(0.5)
        streams_before = open_streams()
        base = rss_kib(pid)
        callers = []

        def during(sample):
            for first in range(0, streams, 50):  # in batches: the target's accept backlog is 64
                batch = [stopped_caller(c, "unix-socket", uds, target=f"edge-1:{port}") for _ in range(50)]
                for caller in batch:
                    assert read_head(caller).startswith(b"HTTP/1.1 200"), "a caller's CONNECT was not answered"
                callers.extend(batch)
                sample()
            for caller in callers:
                caller.sendall(b"w" * bulk)
            for i in range(rounds + 1):
                # Each round waits until the server has sent on every byte of the last: so each byte is a read of
                # its own, and the retained gauge counts exactly what the callers sent.
                expected = streams * (bulk + i)
                wait_until(lambda: retained() == expected, 10, f"{expected} bytes kept to send again")
                sample()
                if i < rounds:
                    for caller in callers:
                        caller.sendall(b"z")
            time.sleep(0.5)
            victim_download(c)  # another node's stream, byte-exact meanwhile

        growth = sample_growth(pid, base, during)
        bound = (6.2 * streams + 2.3 * streams * (bulk + rounds) / 1024) / 1024 + MANY_STREAMS_SLACK_MIB
        print(f"{streams} streams: {growth * 1024 / streams:.1f} KiB per stream (bound {bound:.1f} MiB)")
        assert c.server.alive()
        assert growth < bound, \
            f"server RSS grew by {growth:.1f} MiB for {streams} streams holding {bulk + rounds} bytes each"
        assert open_streams() == streams_before + streams
        for caller in callers:  # the callers go; the target stays stuck
            caller.close()
        wait_until(lambda: open_streams() == streams_before, 20, f"the stream gauge back at {streams_before}")
        wait_until(lambda: retained() == 0, 20, "the kept bytes given back")
        victim_download(c)
        listener.close()
        for conn in held:
            conn.close()
    finally:
        try:
            c.close()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


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
