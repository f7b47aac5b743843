"""Helpers of the claims tests (test_claims*.py): raw agents with real certificates (a HELLO, a registration, a
caller's stream through it, a tunnel lost with a stream open), metrics and log lines, bind mounts in a mount
namespace of a process's own, and the `cluster` fixture (a test module that uses it imports it)."""
import json
import os
import shutil
import socket
import ssl
import threading

import pytest

from support.binaries import BIN, run
from support.harness import metric_of, Cluster, frame, http_get, read_frame, recv_exact, wait_until

HELLO, HELLO_OK, OPEN, OPEN_OK, OPEN_FAIL, DATA, RST, PING, PONG, GOAWAY, REFUSED, RESUME = \
    1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 15, 19


# ---------------------------------------------------------------------------------------------------------------
# Helpers: raw agents with real certificates, metrics, logs.

def agent_cert(c, name):
    """A node certificate of the cluster's CA for `name`, issued without a join (no record in nodes.json)."""
    out = c.tmp / "issued"
    if not (out / f"{name}.crt").exists():
        run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", c.pki, "--name", name, "--org",
            "edge-tunnel:agents", "--out-dir", out)
    return out / f"{name}.crt", out / f"{name}.key"


def raw_hello(c, node, version=3, tokens=None):
    """A raw agent connection of `node`: HELLO (naming `tokens`), then (frame type, JSON payload, TLS socket)."""
    raw = socket.create_connection(("127.0.0.1", c.ports["tunnel"]), timeout=10)
    tls = c.tls_context(*agent_cert(c, node)).wrap_socket(raw)
    body = {"version": version, "nodeName": node, "nodeIPs": [], "capabilities": []}
    if tokens is not None:
        body["resumeTokens"] = tokens
    tls.sendall(frame(HELLO, 0, json.dumps(body).encode()))
    frame_type, _, payload = read_frame(tls)
    return frame_type, json.loads(payload), tls


def hello_answer(c, node, **options):
    """The frame type a raw agent's HELLO is answered with (its connection closed again)."""
    frame_type, _, tls = raw_hello(c, node, **options)
    tls.close()
    return frame_type


def registered(c, node, **options):
    frame_type, ok, tls = raw_hello(c, node, **options)
    assert frame_type == HELLO_OK, ok
    return ok, tls


def stream_through(c, tls, node):
    """A caller's CONNECT to `node` through the secure port, answered by the raw agent on `tls` (OPEN_OK and 5 bytes):
    returns (stream id, the caller's TLS socket), the 5 bytes read. The socket raises on an end without
    close_notify, so that `connection_end` tells a reset."""
    result = {}
    caller = threading.Thread(target=lambda: result.update(
        answer=c.connect_stream(f"{node}:10250", timeout=10, ragged_eof_is_error=True)))
    caller.start()
    while True:
        frame_type, stream_id, payload = read_frame(tls)
        if frame_type == PING:
            tls.sendall(frame(PONG, 0, payload))
        elif frame_type == OPEN:
            tls.sendall(frame(OPEN_OK, stream_id, (1 << 20).to_bytes(4, "big")) + frame(DATA, stream_id, b"12345"))
            break
    caller.join(10)
    status, sock = result["answer"]
    assert status == "HTTP/1.1 200 Connection established", status
    assert recv_exact(sock, 5) == b"12345"
    return stream_id, sock


def still_open(sock, seconds):
    """True if nothing arrives on `sock` and it does not end for `seconds` (a caller that sees a pause)."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(1)
    except socket.timeout:
        return True
    except (OSError, ssl.SSLError):
        return False
    finally:
        sock.settimeout(None)
    raise AssertionError(f"the stream carried {data!r} while it should wait")


def server_metric(c, name):
    return metric_of(http_get(c.meta_url("/metrics"))[1], name)


def agent_metric(agent, name):
    return metric_of(http_get(f"http://127.0.0.1:{agent.meta}/metrics")[1], name)


def log_count(proc, words):
    return proc.own_text().count(words)


def wait_log_count(proc, words, count, timeout=10):
    wait_until(lambda: log_count(proc, words) >= count, timeout, f"{count}× the log line {words!r}")


def lose_tunnel_with_a_stream(c, node, **hello):
    """A raw agent of `node` registers (version 3), carries one caller's stream, and its connection is lost: the
    stream waits. Returns (the HELLO_OK, the stream id, the caller's socket)."""
    waits = log_count(c.server, "agent connection lost: its 1 streams wait 30s")
    ok, tls = registered(c, node, **hello)
    assert len(ok["resumeToken"]) == 32 and ok["resumeGraceSeconds"] == 30, ok
    stream_id, sock = stream_through(c, tls, node)
    tls.close()  # the connection is lost (a FIN without close_notify) with the stream open
    wait_log_count(c.server, "agent connection lost: its 1 streams wait 30s", waits + 1)
    return ok, stream_id, sock


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def in_private_mounts(binds, args):
    """`args` in a mount namespace of its own where each (file, over) of `binds` is bind-mounted over `over`: the
    process sees another /etc/hosts or /etc/resolv.conf, and nothing else changes. The process is the
    same (sh execs it), so signals reach it."""
    mounts = "".join(f'mount --bind "{f}" "{over}" && ' for f, over in binds)
    return ["unshare", "--mount", "sh", "-c", mounts + 'exec "$0" "$@"', *map(str, args)]


def needs_mount_namespaces():
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root (a mount namespace with bind mounts) and unshare")
