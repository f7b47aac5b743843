"""The processes of one benchmark run: the tools it needs, ports, the targets (iperf3, nginx), the PKI and an
EdgeTunnel server and agent pair. `Lab` is the test harness's `Processes`."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

# On sys.path from benchlib/__init__.py:
from freeport import free_port  # shared with the test harness
from support.harness import Proc, Processes  # IntegrationTests/support/harness.py

NEEDED = {"socat": "socat", "iperf3": "iperf3", "wrk": "wrk", "nginx": "nginx-light", "sshd": "openssh-server",
          "ssh": "openssh-client", "openssl": "openssl"}
# How long a stopped process may take to exit before it (and its process group) is killed.
STOP_SECONDS = 10


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def ensure_tools():
    missing = sorted({pkg for tool, pkg in NEEDED.items()
                      if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}")})
    if missing:
        log(f"installing {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=subprocess.DEVNULL)


def listening(port):
    """Whether something listens on TCP `port`, read from /proc/net/tcp: connecting to find out would open a
    connection through a relay to the target, and iperf3's server serves one client at a time."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = pathlib.Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_port(port, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


class Lab(Processes):
    """Starts and stops the processes of one benchmark run: the harness's `Processes`, each process in a session of
    its own and logging to `<tmp>/<name>.log`. `close` sends every process group SIGTERM (the relays' forks too),
    then waits, SIGKILLs a group whose process has not exited after 10 s, and judges no exit code."""

    check, group, together, stop_timeout = False, True, True, STOP_SECONDS

    def __init__(self, tmp, bin_dir):
        super().__init__(tmp)
        self.bin = bin_dir
        # {target: {contender: relay processes}}: what they (and everything they fork) spend per GB and per
        # request.
        self.relays = {}

    def run(self, *args):
        return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True)


def stop(proc):
    """Stops a lab process (a harness `Proc`) or a load generator started in a session of its own (a Popen): SIGTERM
    to its process group, SIGKILL after 10 s."""
    if isinstance(proc, Proc):
        proc.stop(timeout=STOP_SECONDS)
        return
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_targets(lab):
    """An iperf3 server and an nginx serving /1k and /1m on loopback; returns their ports."""
    tmp = lab.tmp
    iperf_port, nginx_port = free_port(), free_port()
    lab.spawn(["iperf3", "-s", "-B", "127.0.0.1", "-p", iperf_port], "iperf3")
    www = tmp / "www"
    www.mkdir()
    (www / "1k").write_bytes(os.urandom(1024))
    (www / "1m").write_bytes(os.urandom(1 << 20))
    # Workers run as root when we are root: a temporary folder is 0700, and nginx's default worker user could
    # not read the files (every request would be a 403).
    user = "user root;" if os.geteuid() == 0 else ""
    (tmp / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on; tcp_nodelay on; keepalive_requests 1000000; keepalive_timeout 120s;
    client_body_temp_path {tmp}/nginx-body;
    server {{ listen 127.0.0.1:{nginx_port}; root {www}; }}
}}
""")
    lab.spawn(["nginx", "-c", tmp / "nginx.conf", "-g", "daemon off;"], "nginx")
    wait_port(iperf_port)
    wait_port(nginx_port)
    return iperf_port, nginx_port


def make_pki(lab, tag):
    pki = lab.tmp / f"pki-{tag}"
    edgetunnel = lab.bin / "edgetunnel"
    lab.run(edgetunnel, "pki", "init", "--pki-dir", pki)
    lab.run(edgetunnel, "pki", "issue-client", "--pki-dir", pki, "--name", "bench")
    return pki


def start_server(lab, tag, pki, extra=(), prefix=()):
    """An EdgeTunnel server on fresh ports; returns its process and ports."""
    tunnel, secure, meta, insecure = free_port(), free_port(), free_port(), free_port()
    uds, grpc = lab.tmp / f"{tag}.sock", lab.tmp / f"{tag}-grpc.sock"
    args = [*prefix, lab.bin / "edge-tunnel-server", "--pki-dir", pki, "--bind-address", "127.0.0.1", "--tunnel-port", tunnel,
            "--secure-port", secure, "--meta-port", meta, "--insecure-port", insecure, "--uds-path", uds,
            "--grpc-uds-path", grpc, "--log-level", "warning", *extra]
    proc = lab.spawn(args, f"server-{tag}")
    wait_port(meta)
    return {"proc": proc, "args": args, "tunnel": tunnel, "secure": secure, "meta": meta, "insecure": insecure,
            "uds": uds, "grpc": grpc, "pki": pki, "tag": tag}


def start_pair(lab, tag, allow_ports, server_extra=()):
    """A fresh server (with `server_extra` flags) and one agent (node `<tag>-edge`) allowed to reach `allow_ports` on
    loopback."""
    pki = make_pki(lab, tag)
    edgetunnel = lab.bin / "edgetunnel"
    token = lab.run(edgetunnel, "token", "create", "--pki-dir", pki).stdout.strip()
    ca_hash = lab.run(edgetunnel, "pki", "ca-hash", "--pki-dir", pki).stdout.strip()
    server = start_server(lab, tag, pki, server_extra)
    agent_meta = free_port()
    node = f"{tag}-edge"
    allow = [a for port in allow_ports for a in ("--allow", f"127.0.0.1:{port}")]
    agent = lab.spawn([lab.bin / "edge-tunnel-agent", "--node-name", node, "--server-address",
                       f"127.0.0.1:{server['tunnel']}", "--pki-dir", lab.tmp / f"agent-{tag}", "--bootstrap-token", token,
                       "--ca-cert-hash", ca_hash, "--meta-port", agent_meta, "--log-level", "warning", *allow],
                      f"agent-{tag}")
    deadline = time.monotonic() + 30
    while b"ok" not in _get(f"http://127.0.0.1:{agent_meta}/readyz"):
        if time.monotonic() > deadline:
            raise RuntimeError("agent did not connect")
        time.sleep(0.1)
    return {**server, "server": server["proc"], "agent": agent, "node": node,
            "cert": pki / "bench.crt", "key": pki / "bench.key", "ca": pki / "ca.crt"}


def server_gauge(server, name, unread=0.0):
    """The value of metric line `name`; `unread` when the metrics could not be fetched (a server too busy to answer
    within 2 s, or not up yet), so that a caller looking for the lowest value can tell that from a real 0."""
    text = _get(f"http://127.0.0.1:{server['meta']}/metrics")
    if not text:
        return unread
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def server_sum(server, name, tries=5):
    """The sum of every series of metric `name` (all label values), or of the one series `name{labels}` names; None
    if the metrics could not be fetched in `tries` attempts (a server too busy to answer, or not up yet)."""
    for _ in range(tries):
        text = _get(f"http://127.0.0.1:{server['meta']}/metrics")
        if text:
            break
    else:
        return None
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and "{" not in name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _get(url):
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read()
    except Exception:
        return b""
