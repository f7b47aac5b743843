#!/usr/bin/env python3
"""Interactive latency under bulk traffic on a thin link: EdgeTunnel against `ssh -R`, under the same shaping.

Two network namespaces, "cloud" and "edge", joined by a veth pair whose both ends are shaped with
`tc qdisc add dev VETH root tbf rate 40mbit burst 32kbit latency 50ms`. The edge runs nginx (a 4-byte file and
an endless bulk file), an EdgeTunnel agent and an `ssh -R` client; the cloud runs the EdgeTunnel server and sshd.
From the cloud, a client times small GETs to the edge's nginx, idle and while one bulk download runs through the
same tunnel, on a keep-alive stream and with a new stream (or connection) per request. The floor is the link
itself: the same small GET over its own TCP connection to the edge while a bulk download runs over another.

Used by `scripts/bench --shaped`; `python3 scripts/shaped.py client ...` is the timing client it runs in the cloud
namespace. Every loop is bounded in count and time; traffic stays inside the namespaces this script creates.
"""
import argparse
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "IntegrationTests"))
from support.harness import Processes  # noqa: E402  (the test harness's process handling)

SHAPE = ["tbf", "rate", "40mbit", "burst", "32kbit", "latency", "50ms"]
CLOUD_IP, EDGE_IP = "10.78.0.1", "10.78.0.2"
NGINX_PORT, SSH_FORWARD_PORT, SSHD_PORT = 8080, 9080, 2222
SMALL = b"GET /4b HTTP/1.1\r\nHost: edge\r\n\r\n"
BULK = b"GET /bulk HTTP/1.1\r\nHost: edge\r\n\r\n"


def log(message):
    print(f"[shaped] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the client (runs inside the cloud namespace)

def open_path(args):
    """A connection to the edge's nginx over the contender's path: a CONNECT stream through the server's Unix
    socket, or a TCP connection to a port (ssh -R's forward, or the edge directly)."""
    if args.uds:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(args.uds)
        sock.sendall(f"CONNECT {args.target} HTTP/1.1\r\nHost: {args.target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            part = sock.recv(4096)
            if not part:
                raise RuntimeError(f"server closed the CONNECT: {head!r}")
            head += part
        if not head.startswith(b"HTTP/1.1 200"):
            first = head.split(b"\r\n")[0]
            raise RuntimeError(f"CONNECT refused: {first!r}")
        return sock
    sock = socket.create_connection((args.host, args.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def small_get(sock):
    """One GET of the 4-byte file on `sock`; the answer read to its end (Content-Length 4)."""
    sock.sendall(SMALL)
    data = b""
    while True:
        part = sock.recv(4096)
        if not part:
            raise RuntimeError("connection closed during a small GET")
        data += part
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and len(body) >= 4:
            return


class Bulk(threading.Thread):
    """One endless download over the contender's path, counting bytes, until stopped."""

    def __init__(self, args):
        super().__init__(daemon=True)
        self.args, self.bytes, self.stop, self.error = args, 0, threading.Event(), None
        self.marks = []

    def run(self):
        try:
            sock = open_path(self.args)
            sock.sendall(BULK)
            deadline = time.monotonic() + 600
            while not self.stop.is_set() and time.monotonic() < deadline:
                part = sock.recv(1 << 16)
                if not part:
                    raise RuntimeError("bulk download ended early")
                self.bytes += len(part)
            sock.close()
        except Exception as error:  # reported by the main thread
            self.error = error

    def mark(self):
        self.marks.append((time.monotonic(), self.bytes))


def client(argv):
    parser = argparse.ArgumentParser(prog="shaped.py client")
    parser.add_argument("--uds")
    parser.add_argument("--target")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--new-per-request", action="store_true")
    parser.add_argument("--bulk", action="store_true")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--gap-ms", type=float, default=50)
    args = parser.parse_args(argv)
    bulk = None
    if args.bulk:
        bulk = Bulk(args)
        bulk.start()
        time.sleep(3)  # the download reaches the link's rate, and the queues fill
        bulk.mark()
    latencies = []
    keep = None if args.new_per_request else open_path(args)
    deadline = time.monotonic() + 120
    for _ in range(args.samples):
        if time.monotonic() > deadline:
            break
        started = time.monotonic()
        if keep is None:
            sock = open_path(args)
            small_get(sock)
            sock.close()
        else:
            small_get(keep)
        latencies.append((time.monotonic() - started) * 1000)
        time.sleep(args.gap_ms / 1000)
    result = {"samples": len(latencies)}
    if bulk:
        bulk.mark()
        bulk.stop.set()
        bulk.join(15)
        if bulk.error:
            raise bulk.error
        (t0, b0), (t1, b1) = bulk.marks[0], bulk.marks[-1]
        result["bulk_mbit_s"] = round((b1 - b0) * 8 / (t1 - t0) / 1e6, 1)
    ordered = sorted(latencies)
    result["p50_ms"] = round(statistics.median(ordered), 1)
    result["p90_ms"] = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))], 1)
    result["max_ms"] = round(ordered[-1], 1)
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- the orchestrator

def sh(*args, check=True, timeout=60):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check, timeout=timeout)


class ShapedLab(Processes):
    """The two namespaces and the processes in them (the harness's `Processes`, logging to `<tmp>/shaped-<name>.log`):
    on exit every process gets SIGTERM, is SIGKILLed if it has not exited 10 s later, and no exit code is judged."""

    check, together, stop_timeout = False, True, 10

    def __init__(self, bin_dir, tmp):
        super().__init__(tmp)
        self.bin = pathlib.Path(bin_dir)
        self.tmp.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:5]
        self.cloud, self.edge = f"etsc{tag}", f"etse{tag}"
        self.veth_cloud, self.veth_edge = f"vsc{tag}", f"vse{tag}"

    def __enter__(self):
        try:
            for ns in (self.cloud, self.edge):
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", self.veth_cloud, "type", "veth", "peer", "name", self.veth_edge)
            for ns, dev, ip in [(self.cloud, self.veth_cloud, CLOUD_IP), (self.edge, self.veth_edge, EDGE_IP)]:
                sh("ip", "link", "set", dev, "netns", ns)
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *SHAPE)
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.close()
        finally:
            for ns in (self.cloud, self.edge):
                sh("ip", "netns", "del", ns, check=False)

    def spawn_in(self, ns, args, name):
        return self.spawn(["ip", "netns", "exec", ns, *args], f"shaped-{name}")

    def wait_http(self, ns, url, what, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sh("ip", "netns", "exec", ns, "curl", "-sf", "-m", "2", url, check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} did not come up (logs in {self.tmp})")

    def wait_listen(self, ns, port, what, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f":{port} " in sh("ip", "netns", "exec", ns, "ss", "-ltnH", check=False).stdout:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} did not listen on {port} (logs in {self.tmp})")

    def start(self):
        tmp, edgetunnel = self.tmp, self.bin / "edgetunnel"
        www = tmp / "shaped-www"
        www.mkdir(exist_ok=True)
        (www / "4b").write_bytes(b"pong")
        with open(www / "bulk", "wb") as f:
            f.truncate(8 << 30)  # sparse: more than any run downloads at 40 Mbit/s
        user = "user root;" if os.geteuid() == 0 else ""
        (tmp / "shaped-nginx.conf").write_text(f"""
{user}
worker_processes 1;
pid {tmp}/shaped-nginx.pid;
error_log {tmp}/shaped-nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on; tcp_nodelay on; keepalive_requests 1000000; keepalive_timeout 300s;
    server {{ listen {NGINX_PORT}; root {www}; }}
}}
""")
        self.spawn_in(self.edge, ["nginx", "-c", tmp / "shaped-nginx.conf", "-g", "daemon off;"], "nginx")

        pki = tmp / "shaped-pki"
        sh(edgetunnel, "pki", "init", "--pki-dir", pki)
        token = sh(edgetunnel, "token", "create", "--pki-dir", pki).stdout.strip()
        ca_hash = sh(edgetunnel, "pki", "ca-hash", "--pki-dir", pki).stdout.strip()
        self.uds = tmp / "shaped.sock"
        self.spawn_in(self.cloud, [self.bin / "edge-tunnel-server", "--pki-dir", pki, "--bind-address", CLOUD_IP,
                                   "--cert-ips", CLOUD_IP, "--meta-port", 10265, "--insecure-port", 0,
                                   "--uds-path", self.uds, "--log-level", "warning"], "server")
        self.wait_http(self.cloud, f"http://{CLOUD_IP}:10265/healthz", "the server")
        self.node = "shaped-edge"
        self.spawn_in(self.edge, [self.bin / "edge-tunnel-agent", "--node-name", self.node, "--server-address",
                                  f"{CLOUD_IP}:10262", "--pki-dir", tmp / "shaped-agent", "--bootstrap-token", token,
                                  "--ca-cert-hash", ca_hash, "--meta-port", 10266, "--log-level", "warning",
                                  "--allow", f"127.0.0.1:{NGINX_PORT}"], "agent")
        self.wait_http(self.edge, "http://127.0.0.1:10266/readyz", "the agent")

        ssh_dir = tmp / "shaped-ssh"
        ssh_dir.mkdir(exist_ok=True)
        for key in ("host", "user"):
            if not (ssh_dir / key).exists():
                sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ssh_dir / key)
        shutil.copy(ssh_dir / "user.pub", ssh_dir / "authorized_keys")
        os.makedirs("/run/sshd", exist_ok=True)
        (ssh_dir / "sshd_config").write_text(f"""
Port {SSHD_PORT}
ListenAddress {CLOUD_IP}
HostKey {ssh_dir}/host
AuthorizedKeysFile {ssh_dir}/authorized_keys
PermitRootLogin yes
StrictModes no
UsePAM no
PidFile {ssh_dir}/sshd.pid
""")
        self.spawn_in(self.cloud, ["/usr/sbin/sshd", "-D", "-e", "-f", ssh_dir / "sshd_config"], "sshd")
        self.wait_listen(self.cloud, SSHD_PORT, "sshd")
        # -tt makes OpenSSH set TCP_NODELAY; a remote command keeps the session open (the ssh rows).
        self.spawn_in(self.edge, ["ssh", "-i", ssh_dir / "user", "-p", SSHD_PORT, "-o", "StrictHostKeyChecking=no",
                                  "-o", "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes",
                                  "-o", "LogLevel=ERROR", "-tt", "-c", "aes128-gcm@openssh.com",
                                  "-R", f"127.0.0.1:{SSH_FORWARD_PORT}:127.0.0.1:{NGINX_PORT}",
                                  f"root@{CLOUD_IP}", "sleep", "86400"], "ssh")
        self.wait_listen(self.cloud, SSH_FORWARD_PORT, "ssh -R")

    def measure(self, path, new_per_request, bulk, samples):
        args = ["ip", "netns", "exec", self.cloud, sys.executable, __file__, "client", "--samples", samples]
        if path == "edgetunnel":
            args += ["--uds", self.uds, "--target", f"{self.node}:{NGINX_PORT}"]
        elif path == "ssh":
            args += ["--host", "127.0.0.1", "--port", SSH_FORWARD_PORT]
        else:  # the link itself: straight to the edge, each download and request on its own connection
            args += ["--host", EDGE_IP, "--port", NGINX_PORT]
        if new_per_request:
            args.append("--new-per-request")
        if bulk:
            args.append("--bulk")
        client = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        paced = None
        if path == "edgetunnel":
            # While the download runs (3 s before the first request): does the agent say its tunnel is paced?
            time.sleep(2)
            paced = self.agent_paced_tunnels()
        try:
            stdout, stderr = client.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            client.kill()
            raise
        if client.returncode != 0:
            raise RuntimeError(f"client {path} failed: {stderr.strip()[-500:]}")
        result = json.loads(stdout.strip().splitlines()[-1])
        if paced is not None:
            result["agent_paced_tunnels"] = paced
        return result

    def agent_paced_tunnels(self):
        """The agent's `edge_tunnel_agent_paced_tunnels` now (its tunnels on a slow link), or None."""
        out = sh("ip", "netns", "exec", self.edge, "curl", "-s", "--max-time", "5", "http://127.0.0.1:10266/metrics",
                 check=False)
        for line in out.stdout.splitlines():
            if line.startswith("edge_tunnel_agent_paced_tunnels "):
                return int(float(line.split()[1]))
        return None


ROWS = [
    ("EdgeTunnel, one keep-alive CONNECT stream", "edgetunnel", False),
    ("EdgeTunnel, a new stream (CONNECT) per request", "edgetunnel", True),
    ("ssh -R aes128-gcm -tt, keep-alive", "ssh", False),
    ("ssh -R aes128-gcm -tt, a new connection per request", "ssh", True),
    ("the link: separate TCP connections, a new one per request", "direct", True),
]


def run(bin_dir, tmp, samples=100, rounds=1):
    """Every row idle and under bulk, `rounds` times interleaved; returns {row: {idle: [...], bulk: [...]}}."""
    results = {row: {"idle": [], "bulk": []} for row, _, _ in ROWS}
    with ShapedLab(bin_dir, tmp) as lab:
        lab.start()
        for round_ in range(rounds):
            for row, path, new in ROWS:
                for mode in ("idle", "bulk"):
                    result = lab.measure(path, new, mode == "bulk", samples)
                    log(f"round {round_ + 1}: {row}, {mode}: {result}")
                    results[row][mode].append(result)
    return results


def table(results):
    lines = ["| path | idle p50 | under bulk p50 / p90 | bulk Mbit/s |", "|---|---|---|---|"]
    for row, runs in results.items():
        idle = statistics.median(r["p50_ms"] for r in runs["idle"])
        p50 = statistics.median(r["p50_ms"] for r in runs["bulk"])
        p90 = statistics.median(r["p90_ms"] for r in runs["bulk"])
        rate = statistics.median(r["bulk_mbit_s"] for r in runs["bulk"])
        lines.append(f"| {row} | {idle:.1f} ms | {p50:.1f} / {p90:.1f} ms | {rate:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client(sys.argv[2:])
    else:
        parser = argparse.ArgumentParser()
        parser.add_argument("--bin", default=str(pathlib.Path(__file__).resolve().parents[1] / ".build/release"))
        parser.add_argument("--samples", type=int, default=100)
        parser.add_argument("--rounds", type=int, default=1)
        options = parser.parse_args()
        import tempfile
        with tempfile.TemporaryDirectory(prefix="edgetunnel-shaped-") as tmp:
            found = run(options.bin, tmp, options.samples, options.rounds)
            print(json.dumps(found))
            print(table(found))
