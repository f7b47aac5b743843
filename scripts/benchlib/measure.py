"""What the suite measures: iperf3 and wrk through each contender with the relays' CPU, the /proc readings (RSS,
CPU seconds of a process and of its descendants), stream set-up (`edgetunnel bench streams`), the footprint of an
idle agent and of idle streams, and the resume A/B."""
import json
import os
import pathlib
import re
import socket
import subprocess
import time

from benchlib.lab import log, server_gauge, start_pair, start_targets, stop, wait_port
from benchlib.report import summarize
from freeport import free_port


def rss_mib(proc, field="VmRSS"):
    """RSS in MiB; field="RssAnon" gives the process's own (anonymous) memory, without mapped code."""
    for line in pathlib.Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {proc.pid}")


def cpu_seconds(proc):
    fields = pathlib.Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(procs):
    """CPU seconds of `procs` and all their descendants, including children they have already reaped."""
    parents, times = {}, {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        times[pid] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    chosen = {p.pid for p in procs}
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in chosen} - chosen
        chosen |= more
        grew = bool(more)
    return sum(times.get(pid, 0) for pid in chosen) / os.sysconf("SC_CLK_TCK")


def relay_cpu_during(relays, measure):
    """Runs `measure()`; returns its result and the CPU seconds `relays` and their children spent meanwhile
    (None when there are no relays)."""
    before = tree_cpu_seconds(relays)
    result = measure()
    if not relays:
        return result, None
    time.sleep(0.3)  # socat reaps its children: their CPU moves to it
    return result, tree_cpu_seconds(relays) - before


def iperf(port, seconds, parallel):
    """Gbit/s and bytes received."""
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(parallel), "-J"],
                         capture_output=True, text=True, timeout=seconds + 60)
    data = json.loads(out.stdout)
    if "error" in data:
        raise RuntimeError(data["error"])
    received = data["end"]["sum_received"]
    return received["bits_per_second"] / 1e9, received["bytes"]


def wrk(port, path, seconds, connections, host=None):
    header = ["-H", f"Host: {host}"] if host else []
    out = subprocess.run(["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--latency", *header,
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=seconds + 60)
    text = out.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if found is None:
        raise RuntimeError(f"wrk produced no result: {out.stderr.strip() or text.strip()}")
    rps = float(found.group(1))
    requests = int(re.search(r"(\d+) requests in", text).group(1))

    def latency(pct):
        # A run in which no request completed has no latency distribution.
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)\b", text)
        if m is None:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 0.001, "ms": 1, "s": 1000}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", text)
    return {"rps": rps, "requests": requests, "p50_ms": latency(50), "p99_ms": latency(99),
            "errors": errors.group(0) if errors else ""}


class Sink:
    """A TCP target that accepts connections and holds them idle (the far end of idle streams)."""

    def __init__(self):
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16384)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def drop(self):
        for conn in self.conns:
            conn.close()
        self.conns = []


def bench_streams(lab, pair, target, count, concurrency=50, tls=False, hold=False):
    """`edgetunnel bench streams`: returns its JSON report (and the holding process when `hold`)."""
    args = [lab.bin / "edgetunnel", "bench", "streams", "--to", f"{pair['node']}:{target}", "--count", count,
            "--concurrency", concurrency]
    if tls:
        args += ["--server", f"127.0.0.1:{pair['secure']}", "--ca-file", pair["ca"], "--cert", pair["cert"],
                 "--key", pair["key"]]
    else:
        args += ["--server", f"unix:{pair['uds']}"]
    if not hold:
        out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)
        if not out.stdout.strip():
            raise RuntimeError(f"bench streams failed: {out.stderr.strip()}")
        return json.loads(out.stdout.splitlines()[0]), None
    proc = subprocess.Popen([str(a) for a in [*args, "--hold"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"bench streams --hold failed: {proc.stderr.read().strip()}")
    return json.loads(line), proc


def wait_streams_gone(server, timeout=20):
    deadline = time.monotonic() + timeout
    while server_gauge(server, "edge_tunnel_server_streams") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)


def measure_setup(lab, quick):
    """New streams per second through one agent and CONNECT→200 latency, via the Unix socket and via TLS."""
    pair = lab.pair
    uds, _ = bench_streams(lab, pair, lab.targets["nginx"], 500 if quick else 10000)
    tls, _ = bench_streams(lab, pair, lab.targets["nginx"], 200 if quick else 2000, tls=True)
    return {"uds": uds, "tls": tls}


def rss_holding_streams(lab, pair, sink, count, concurrency=50):
    """RSS (MiB) of the pair's agent and server while `count` idle streams to the sink are held open."""
    report, holder = bench_streams(lab, pair, sink.port, count, concurrency=concurrency, hold=True)
    try:
        if report["failures"]:
            raise RuntimeError(f"idle streams failed: {report['first_error']}")
        time.sleep(1)
        return rss_mib(pair["agent"]), rss_mib(pair["server"])
    finally:
        stop(holder)
        sink.drop()


def measure_footprint(lab, quick, sink):
    """RSS of an idle agent, per idle stream on each side, and CPU seconds per GB moved."""
    few, many = (100, 300) if quick else (1000, 10000)
    pair = start_pair(lab, f"fp{len(lab.procs)}", [sink.port, lab.targets["iperf"]])
    time.sleep(2)
    idle_agent, idle_server = rss_mib(pair["agent"]), rss_mib(pair["server"])
    idle_agent_anon = rss_mib(pair["agent"], "RssAnon")
    agent_few, server_few = rss_holding_streams(lab, pair, sink, few)
    wait_streams_gone(pair)

    # CPU per GB on the same pair: one iperf3 stream through a Unix-socket forward.
    forward = free_port()
    fwd = lab.spawn([lab.bin / "edgetunnel", "forward", "--server", f"unix:{pair['uds']}", "--listen",
                     f"127.0.0.1:{forward}", "--to", f"{pair['node']}:{lab.targets['iperf']}"], f"forward-{pair['tag']}")
    wait_port(forward)
    size = (256 if quick else 4096) << 20
    before = (cpu_seconds(pair["server"]), cpu_seconds(pair["agent"]), cpu_seconds(fwd))
    subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(forward), "-n", str(size), "-J"], check=True,
                   capture_output=True, timeout=300)
    after = (cpu_seconds(pair["server"]), cpu_seconds(pair["agent"]), cpu_seconds(fwd))
    gb = size / 1e9
    stop(fwd)

    # The server with many idle streams: a second fresh pair, so that memory freed above does not hide growth.
    big = start_pair(lab, f"fq{len(lab.procs)}", [sink.port])
    time.sleep(2)
    base_agent, base_server = rss_mib(big["agent"]), rss_mib(big["server"])
    agent_many, server_many = rss_holding_streams(lab, big, sink, many, concurrency=100)
    for p in (pair, big):
        stop(p["agent"])
        stop(p["server"])
    return {
        "idle_agent_mib": idle_agent, "idle_agent_anon_mib": idle_agent_anon, "idle_server_mib": idle_server,
        "streams_few": few, "streams_many": many,
        "agent_kib_per_stream_few": (agent_few - idle_agent) * 1024 / few,
        "server_kib_per_stream_few": (server_few - idle_server) * 1024 / few,
        "agent_kib_per_stream_many": (agent_many - base_agent) * 1024 / many,
        "server_kib_per_stream_many": (server_many - base_server) * 1024 / many,
        "server_cpu_s_per_gb": (after[0] - before[0]) / gb,
        "agent_cpu_s_per_gb": (after[1] - before[1]) / gb,
        "forward_cpu_s_per_gb": (after[2] - before[2]) / gb,
    }


def measure_resume_ab(lab, runs, seconds):
    """The cost of resumable tunnels (retention, lingering streams): two EdgeTunnel pairs, one with the default
    grace period and one with --resume-grace-seconds 0, measured interleaved on the same targets: one iperf3 stream
    through TLS CONNECT, and 1 KiB and 1 MiB requests through the Host-routed HTTP port."""
    iperf_port, nginx_port = start_targets(lab)
    variants = {"resumable": (), "not resumable": ("--resume-grace-seconds", "0")}
    entries = {}
    for index, (name, extra) in enumerate(variants.items()):
        pair = start_pair(lab, f"ab{index}", [iperf_port, nginx_port], extra)
        forward = free_port()
        lab.spawn([lab.bin / "edgetunnel", "forward", "--server", f"127.0.0.1:{pair['secure']}", "--ca-file",
                   pair["ca"], "--cert", pair["cert"], "--key", pair["key"], "--listen", f"127.0.0.1:{forward}",
                   "--to", f"{pair['node']}:{iperf_port}"], f"forward-ab{index}")
        wait_port(forward)
        entries[name] = (forward, pair["insecure"], f"{pair['node']}:{nginx_port}")
    raw = {name: {"iperf1": [], "wrk1k": [], "wrk1m": []} for name in variants}
    for run in range(runs):
        for name, (forward, insecure, host) in entries.items():
            log(f"run {run + 1}/{runs}: {name}")
            raw[name]["iperf1"].append(iperf(forward, seconds, 1)[0])
            raw[name]["wrk1k"].append(wrk(insecure, "/1k", seconds, 50, host)["rps"])
            raw[name]["wrk1m"].append(wrk(insecure, "/1m", seconds, 50, host)["rps"])
    return {name: {key: summarize(values) for key, values in r.items()} for name, r in raw.items()}
