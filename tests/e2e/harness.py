"""Starts real EdgeTunnel processes for end-to-end tests and talks to them with real clients."""
import json
import os
import pathlib
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request

from conftest import BIN, run

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
from freeport import free_port  # noqa: E402  (shared with scripts/bench)

HERE = pathlib.Path(__file__).resolve().parent


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Proc:
    """A background process whose output goes to a log file."""

    def __init__(self, args, log, env=None):
        self.log = log
        self.handle = open(log, "ab")
        self.popen = subprocess.Popen([str(a) for a in args], stdout=self.handle, stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True)

    def text(self):
        return pathlib.Path(self.log).read_text(errors="replace")

    def expect_log(self, words, timeout=5):
        """Waits for `words` in the log: a process writes its log line after the effect a test observes."""
        wait_until(lambda: words in self.text(), timeout, f"the log line {words!r}")

    def alive(self):
        return self.popen.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.handle.close()
        return self.popen.returncode


class Cluster:
    """A PKI, a server, agents and edge services on loopback, all stopped at teardown."""

    def __init__(self, tmp):
        self.tmp = pathlib.Path(tmp)
        self.pki = self.tmp / "pki"
        self.procs = []
        run(BIN / "edgetunnel", "pki", "init", "--pki-dir", self.pki)
        run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", self.pki, "--name", "operator")
        self.ca = self.pki / "ca.crt"
        self.cert = self.pki / "operator.crt"
        self.key = self.pki / "operator.key"
        self.ca_hash = run(BIN / "edgetunnel", "pki", "ca-hash", "--pki-dir", self.pki).stdout.strip()
        self.ports = {name: free_port() for name in ("tunnel", "secure", "meta", "insecure")}

    def token(self, ttl="1h"):
        return run(BIN / "edgetunnel", "token", "create", "--pki-dir", self.pki, "--ttl", ttl).stdout.strip()

    def spawn(self, args, name, env=None):
        proc = Proc(args, self.tmp / f"{name}.log", env=env)
        self.procs.append(proc)
        return proc

    def start_server(self, *extra, wait=True):
        self.server = self.spawn([
            BIN / "edge-tunnel-server", "--pki-dir", self.pki, "--bind-address", "127.0.0.1",
            "--tunnel-port", self.ports["tunnel"], "--secure-port", self.ports["secure"],
            "--meta-port", self.ports["meta"], "--insecure-port", self.ports["insecure"], "--server-id", "test-server",
            *extra], "server")
        if wait:
            wait_until(lambda: http_get(self.meta_url("/readyz"))[0] == 200, 20, "server /readyz")
        return self.server

    def meta_url(self, path):
        return f"http://127.0.0.1:{self.ports['meta']}{path}"

    def agents(self):
        return json.loads(http_get(self.meta_url("/v1/agents"))[1])["agents"]

    def start_agent(self, name, *extra, ips=("127.0.0.1",), join=True, wait=True, pki=None):
        meta = free_port()
        args = [BIN / "edge-tunnel-agent", "--node-name", name, "--server-address",
                f"127.0.0.1:{self.ports['tunnel']}", "--pki-dir", pki or self.tmp / f"agent-{name}",
                "--meta-port", meta]
        for ip in ips:
            args += ["--node-ip", ip]
        if join:
            args += ["--bootstrap-token", self.token(), "--ca-cert-hash", self.ca_hash]
        agent = self.spawn(args + list(extra), f"agent-{name}")
        agent.meta = meta
        if wait:
            wait_until(lambda: http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200, 20, f"agent {name} ready")
        return agent

    def start_edge_service(self, port=None):
        port = port or free_port()
        service = self.spawn([sys.executable, HERE / "edge_service.py", "127.0.0.1", port], f"edge-{port}")
        wait_until(lambda: socket.create_connection(("127.0.0.1", port), 1).close() is None, 10, "edge service")
        return port

    def curl(self, url, *extra, check=False, timeout=120):
        args = ["curl", "-sS", "--proxy-cacert", self.ca, "--proxy-cert", self.cert, "--proxy-key", self.key,
                "-p", "-x", f"https://127.0.0.1:{self.ports['secure']}", *extra, url]
        return run(*args, check=check)

    def tls_context(self, cert=None, key=None):
        context = ssl.create_default_context(cafile=str(self.ca))
        context.check_hostname = False
        if cert:
            context.load_cert_chain(str(cert), str(key))
        return context

    def connect_stream(self, target, cert=None, key=None, timeout=30):
        """A CONNECT stream through the secure port; returns (status line, socket)."""
        raw = socket.create_connection(("127.0.0.1", self.ports["secure"]), timeout=timeout)
        tls = self.tls_context(cert or self.cert, key or self.key).wrap_socket(raw)
        tls.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = tls.recv(1)
            if not data:
                break
            head += data
        return head.split(b"\r\n", 1)[0].decode(), tls

    def close(self):
        for proc in reversed(self.procs):
            proc.stop(signal.SIGKILL if proc.alive() and False else signal.SIGTERM, timeout=5)


def frame(frame_type, stream_id, payload):
    return struct.pack(">BBHII", frame_type, 0, 0, stream_id, len(payload)) + payload


def read_frame(sock):
    header = recv_exact(sock, 12)
    frame_type, _, _, stream_id, length = struct.unpack(">BBHII", header)
    return frame_type, stream_id, recv_exact(sock, length)


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def rss_kib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
