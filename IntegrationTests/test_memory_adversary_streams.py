"""Memory adversaries (issue 25) that hold streams full: a resumable tunnel lost while its streams are full (held
for the resume grace, then given back), and 300 streams holding a few hundred bytes each. Each scenario samples the
process's RSS from a baseline taken once its windows are full and holds it to the bound of docs/SECURITY.md ("The
most memory peers can make us hold"). The one-byte scenarios are in test_memory_adversary.py; helpers in
support/memory.py.
"""
import json
import resource
import socket
import struct
import threading
import time

from support.harness import Cluster, frame, read_frame, read_head, rss_kib, wait_until
from support.hostile import attacker_tunnel, victim_download
from support.memory import (GROWTH_BOUND_MIB, sample_growth, Credit, stuck_target, stopped_caller, answer_open,
                            resumable_hello, drain_frames, server_metric, attacker_certificate)


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
