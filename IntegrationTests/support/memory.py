"""Helpers of the memory adversary tests (test_memory_adversary*.py): the RSS growth bound and its sampling, a
raw agent's flow-control credit, targets and callers that stop reading, a hostile agent's OPEN answers, resumable
HELLOs and frame draining, server metrics and an attacker's node certificate."""
import json
import select
import socket
import struct
import threading
import time

from support.binaries import BIN, run
from support.harness import frame, http_get, read_frame, rss_kib


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
