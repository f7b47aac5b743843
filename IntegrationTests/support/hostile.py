"""The raw peer and the hostile scenarios (docs/SECURITY.md): an attacker with edge-1's real agent certificate
speaking raw frames on the tunnel port, a victim (agent edge-2 and its edge service) whose downloads must stay
byte-exact meanwhile, and `hostile_scenario`, which plays an attack for SCENARIO_SECONDS and asserts the four bounds
(the server stays up, the victim is served, RSS growth under RSS_GROWTH_BOUND_MIB, descriptors back to baseline).

`lab` is a fixture: a test module that uses it imports it."""
import contextlib
import hashlib
import json
import math
import os
import resource
import socket
import ssl
import threading
import time

import pytest

from conftest import BIN, run
from edge_service import blob_sha256
from support.harness import Cluster, frame, http_get, read_all, read_frame, rss_kib, wait_until

# How long each hostile scenario plays the attacker: EDGE_TUNNEL_SCENARIO_SECONDS, 12 by default (scripts/test);
# `EDGE_TUNNEL_SCENARIO_SECONDS=30 scripts/test` is the long run. The counts the scenarios assert are stated for 30 s
# and scaled to the length with `at_least`: the same rate is asserted whatever the length.
SCENARIO_SECONDS = float(os.environ.get("EDGE_TUNNEL_SCENARIO_SECONDS") or 12)
assert SCENARIO_SECONDS >= 5, f"EDGE_TUNNEL_SCENARIO_SECONDS={SCENARIO_SECONDS}: at least 5 s"


def at_least(count_in_30_s):
    """A lower bound stated for a 30-s scenario, for one of SCENARIO_SECONDS."""
    return max(1, math.ceil(count_in_30_s * SCENARIO_SECONDS / 30))


# The server's RSS may grow by at most this much during an attack (a legitimate stream's window is 1 MiB;
# the attacks below could grow it by gigabytes before the fixes).
RSS_GROWTH_BOUND_MIB = 96
VICTIM_SOURCE = "127.0.0.2"  # the victim caller's address: per-source limits must not catch it
VICTIM_BLOB = 256 * 1024
# Seconds one victim download may take while an attack runs. Measured: 0.08 s at most during most attacks; up to
# 9.4 s under the PING flood with a debug build on a slower machine (see test_hostile_peers.py), so twice that.
VICTIM_DEADLINE = 20


@pytest.fixture
def lab(tmp_path):
    """A server, a real agent edge-2 with an edge service, and an agent certificate for edge-1 (the attacker)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    c = Cluster(tmp_path)
    try:
        c.start_server()
        c.victim_port = c.start_edge_service()
        c.victim = c.start_agent("edge-2", "--allow", f"127.0.0.1:{c.victim_port}")
        run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", c.pki, "--name", "edge-1",
            "--org", "edge-tunnel:agents", "--out-dir", tmp_path / "attacker")
        c.attacker_cert = tmp_path / "attacker" / "edge-1.crt"
        c.attacker_key = tmp_path / "attacker" / "edge-1.key"
        yield c
    finally:  # also when the set-up failed: no process outlives the test
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        c.close()


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def victim_download(c):
    """One CONNECT through the secure port from VICTIM_SOURCE to edge-2, a blob downloaded and checked."""
    raw = socket.create_connection(("127.0.0.1", c.ports["secure"]), timeout=10, source_address=(VICTIM_SOURCE, 0))
    with c.tls_context(c.cert, c.key).wrap_socket(raw) as tls:
        tls.sendall(f"CONNECT edge-2:{c.victim_port} HTTP/1.1\r\nHost: edge-2\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = tls.recv(1)
            assert chunk, f"connection closed during the CONNECT answer: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        tls.sendall(f"GET /blob/{VICTIM_BLOB} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = read_all(tls, timeout=10)
    body = data.split(b"\r\n\r\n", 1)[1]
    assert hashlib.sha256(body).hexdigest() == blob_sha256(VICTIM_BLOB), "the victim's stream was not byte-exact"


def hostile_scenario(c, attack, seconds=SCENARIO_SECONDS):
    """Runs `attack(stop_event)` in a thread for `seconds` while the victim downloads; asserts the four bounds.
    Returns what the attack returned."""
    pid = c.server.popen.pid
    victim_download(c)
    time.sleep(0.5)
    base_fds = fd_count(pid)
    base_rss = rss_kib(pid)
    stop = threading.Event()
    outcome = {}

    def run_attack():
        try:
            outcome["value"] = attack(stop)
        except BaseException as error:  # reported by the main thread
            outcome["error"] = error

    attacker = threading.Thread(target=run_attack, daemon=True)
    attacker.start()
    peak, downloads, slowest = base_rss, 0, 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert c.server.alive(), "the server died during the attack"
        started = time.monotonic()
        victim_download(c)
        slowest = max(slowest, time.monotonic() - started)
        downloads += 1
        peak = max(peak, rss_kib(pid))
        time.sleep(0.2)
    stop.set()
    attacker.join(60)
    assert not attacker.is_alive(), "the attack did not stop"
    if "error" in outcome:
        raise outcome["error"]
    assert c.server.alive(), "the server died during the attack"
    # Served throughout: every download completes, none waits past a bound. (A count per 30 s depended on the
    # machine: a debug build on a slower machine managed 5-6 under the PING flood, as did the older code.)
    print(f"victim: {downloads} downloads in {seconds}s, the slowest took {slowest:.2f}s")  # shown with -s
    # 3 in 30 s; never fewer than 2, a download begun before the end counts (one may take 9.4 s, see above).
    assert downloads >= max(2, int(3 * seconds / 30)) and slowest < VICTIM_DEADLINE, \
        f"{downloads} victim downloads in {seconds}s, the slowest took {slowest:.1f}s"
    growth_mib = (peak - base_rss) / 1024
    assert growth_mib < RSS_GROWTH_BOUND_MIB, f"server RSS grew by {growth_mib:.0f} MiB"
    wait_until(lambda: fd_count(pid) <= base_fds, 30, f"server descriptors back to {base_fds}")
    victim_download(c)
    return outcome.get("value")


@contextlib.contextmanager
def attacker_tunnel(c, cert=True):
    """A raw TLS connection to the tunnel port, with edge-1's agent certificate or none."""
    context = c.tls_context(c.attacker_cert, c.attacker_key) if cert else c.tls_context()
    raw = socket.create_connection(("127.0.0.1", c.ports["tunnel"]), timeout=10)
    with context.wrap_socket(raw) as tls:
        yield tls


def frames_until_closed(tls, seconds=5, answer_pings=True):
    """Every frame the server sends until it closes the connection (EOF or reset; PINGs answered unless
    `answer_pings` is false). Fails when the connection is still open after `seconds`: a timeout is not a close."""
    deadline = time.monotonic() + seconds
    seen = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            tls.settimeout(left)
            frame_type, _, payload = read_frame(tls)
            seen.append((frame_type, payload))
            if frame_type == 10 and answer_pings:
                tls.sendall(frame(11, 0, payload))
    except socket.timeout:
        raise AssertionError(f"the server had not closed the connection after {seconds}s; it sent "
                             f"{[t for t, _ in seen]}") from None
    except (ConnectionError, ssl.SSLError, OSError):
        return seen


def hello(node, ips=()):
    return frame(1, 0, json.dumps({"version": 2, "nodeName": node, "nodeIPs": list(ips), "capabilities": []}).encode())


def limit_hits(c, limit):
    for line in http_get(c.meta_url("/metrics"))[1].splitlines():
        if line.startswith(f'edge_tunnel_server_limit_hits_total{{limit="{limit}"}}'):
            return float(line.split()[-1])
    return 0.0


ATTACKER_SOURCE = "127.0.0.3"


def refusal(tls):
    """The REFUSED frame's reason, or None if the connection closed without one."""
    try:
        while True:
            frame_type, _, payload = read_frame(tls)
            if frame_type == 15:
                return json.loads(payload)["reason"]
    except (ConnectionError, ssl.SSLError, OSError):
        return None


def csr_for(tmp, name):
    return run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
               "-keyout", tmp / f"{name}.key", "-subj", f"/O=edge-tunnel:agents/CN={name}").stdout
