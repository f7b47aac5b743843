"""Callers on the server's own host: `edgetunnel forward` (a local port onto a node's target) reporting a refused
stream, and the Unix socket frontend (`--uds-path`): CONNECT and forward over it, a rolling restart that shares its
path, and a bad path refused in one line."""
import hashlib
import os
import stat
import socket
import subprocess

from conftest import BIN, assert_one_line_error, run
from edge_service import blob_sha256
from support.harness import Cluster, free_port, read_all, read_head, wait_until
from support.tunnel import cluster, edge  # noqa: F401  (fixtures)


def test_forward_reports_a_refused_stream(cluster, edge):
    local = free_port()
    forward = cluster.spawn([BIN / "edgetunnel", "forward", "--server", f"127.0.0.1:{cluster.ports['secure']}",
                             "--ca-file", cluster.ca, "--cert", cluster.cert, "--key", cluster.key,
                             "--listen", f"127.0.0.1:{local}", "--to", "ghost:10250"], "forward-ghost")
    wait_until(lambda: "forwarding" in forward.text(), 10, "forward to listen")
    with socket.create_connection(("127.0.0.1", local), timeout=10) as s:
        assert s.recv(10) == b""
    wait_until(lambda: "no agent for node ghost" in forward.text(), 5, "the refusal to be logged")
    bad = run(BIN / "edgetunnel", "forward", "--server", "nowhere", "--ca-file", cluster.ca, "--cert", cluster.cert,
              "--key", cluster.key, "--to", "edge-1:1", check=False)
    assert_one_line_error(bad, "--server", "nowhere")


def test_unix_socket_frontend_for_a_colocated_caller(tmp_path):
    c = Cluster(tmp_path)
    try:
        sock_path = tmp_path / "tunnel.sock"
        c.start_server("--uds-path", sock_path)
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        port = c.start_edge_service()
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(sock_path))
            s.sendall(f"CONNECT edge-1:{port} HTTP/1.1\r\nHost: edge-1:{port}\r\n\r\n".encode())
            assert read_head(s).startswith(b"HTTP/1.1 200")
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = read_all(s, timeout=10)
            assert data.endswith(b"hello from the edge\n")
        local = free_port()
        forward = c.spawn([BIN / "edgetunnel", "forward", "--server", f"unix:{sock_path}", "--listen",
                           f"127.0.0.1:{local}", "--to", f"edge-1:{port}"], "forward-uds")
        wait_until(lambda: "forwarding" in forward.text(), 10, "forward to listen")
        size = 20 * 1024 * 1024
        out = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{local}/blob/{size}"], capture_output=True, check=True,
                             timeout=60).stdout
        assert hashlib.sha256(out).hexdigest() == blob_sha256(size)
        c.server.stop()
        assert not sock_path.exists()
    finally:
        c.close()


def test_a_stopping_server_leaves_the_unix_socket_of_its_successor(tmp_path):
    """Rolling restart on a shared --uds-path: the new server replaces the socket file while the old one still
    runs; the old one's shutdown must not remove the new one's socket."""
    sock_path = tmp_path / "tunnel.sock"
    old, new = Cluster(tmp_path / "old"), Cluster(tmp_path / "new")
    try:
        old.start_server("--uds-path", sock_path)
        new.start_server("--uds-path", sock_path)
        old.server.stop()
        assert sock_path.exists()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(sock_path))
            s.sendall(b"CONNECT ghost:80 HTTP/1.1\r\nHost: ghost:80\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 502")  # the new server answers: no agent for ghost
        new.server.stop()
        assert not sock_path.exists()  # its own socket it does remove
    finally:
        try:
            old.close()
        finally:
            new.close()


def test_a_bad_unix_socket_path_is_one_clear_line(tmp_path):
    c = Cluster(tmp_path)
    try:
        not_a_socket = tmp_path / "plain-file"
        not_a_socket.write_text("keep me")
        too_long = tmp_path / ("s" * 120)
        for path, words in ((not_a_socket, "is not a socket"), (too_long, "longer than a Unix socket path")):
            server = c.start_server("--uds-path", path, wait=False).expect_exit()  # it must refuse to start
            assert server.popen.wait(20) != 0
            errors = [line for line in server.text().splitlines() if "error:" in line and str(path) in line]
            assert len(errors) == 1 and words in errors[0], server.text()
        assert not_a_socket.read_text() == "keep me"
    finally:
        c.close()
