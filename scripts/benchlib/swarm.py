"""Swarms of agents (`edgetunnel bench swarm`): N agents against one fresh server (connect, memory, idle CPU,
reconnect after a restart), and N agents against replicas behind one iptables-balanced Service address."""
import os
import pathlib
import socket
import subprocess
import time

from benchlib.lab import log, make_pki, server_gauge, server_sum, start_server, stop, wait_port
from benchlib.measure import cpu_seconds, rss_mib


def measure_swarm(lab, agents):
    """N agents from one `edgetunnel bench swarm` process against a fresh server: time until all are connected,
    the server's RSS and idle CPU, and the time until all are back after the server restarts."""
    pki = make_pki(lab, f"swarm{agents}-{len(lab.procs)}")
    server = start_server(lab, f"swarm{agents}-{len(lab.procs)}", pki)
    base = rss_mib(server["proc"])
    swarm = subprocess.Popen([str(lab.bin / "edgetunnel"), "bench", "swarm", "--server",
                              f"127.0.0.1:{server['tunnel']}", "--pki-dir", str(pki), "--agents", str(agents)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        start = time.monotonic()
        connected_at = wait_agents(server, agents, 180)
        time.sleep(3)
        rss = rss_mib(server["proc"])
        cpu0 = cpu_seconds(server["proc"])
        time.sleep(5)
        idle_cpu = (cpu_seconds(server["proc"]) - cpu0) / 5 * 100
        # Restart: stop the server, start it again on the same ports, count until every agent is back.
        stop(server["proc"])
        restarted = time.monotonic()
        proc = lab.spawn(server["args"], f"server-{server['tag']}-again")
        wait_port(server["meta"])
        back_at = wait_agents(server, agents, 180)
        back = back_at - restarted if back_at else None
        stop(proc)
    finally:
        stop(swarm)
    return {"agents": agents, "connect_s": connected_at - start if connected_at else None, "server_rss_mib": rss,
            "server_base_mib": base, "kib_per_agent": (rss - base) * 1024 / agents, "idle_cpu_percent": idle_cpu,
            "reconnect_s": back}


def wait_agents(server, agents, timeout):
    """Waits until the server counts `agents` agents; returns when (monotonic), or None after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server_gauge(server, "edge_tunnel_server_agents") >= agents:
            return time.monotonic()
        time.sleep(0.25)
    return None


# On the tunnel port a connection counts as authenticated when its agent's HELLO registers a tunnel: one TLS
# handshake each. A handshake whose HELLO is refused as a duplicate is counted under DUPLICATES.
REGISTERED = 'edge_tunnel_server_connections_authenticated_total{port="tunnel"}'
PROBES = "edge_tunnel_server_replica_probes_total"
DUPLICATES = "edge_tunnel_server_duplicate_tunnels_total"
REJECTED = "edge_tunnel_server_connections_rejected_total"


def costs(servers):
    """What the replicas have spent on admitting agents so far, summed: tunnels registered (a TLS handshake each),
    replica probes answered, registrations refused as duplicates (a handshake wasted each), connections turned away
    before authenticating."""
    found = {}
    for name, metric in (("registered", REGISTERED), ("probes", PROBES), ("duplicates", DUPLICATES),
                         ("rejected", REJECTED)):
        values = [server_sum(s, metric) for s in servers]
        # a server that could not be read is reported as unknown, not as having counted nothing
        found[name] = None if None in values else sum(values)
    return found


def per_agent(after, before, agents):
    """Per agent, what was counted between `before` and `after` (None where either could not be read)."""
    return {name: None if after[name] is None or before.get(name, 0) is None
            else round((after[name] - before.get(name, 0)) / agents, 2) for name in after}


def arrival_profile(samples, agents):
    """How the returned replica's authenticated tunnels arrived, from (seconds since restart, count) samples taken
    about every 0.25 s (longer apart when the machine is busy): each interval's arrivals spread evenly over it, then
    counted per second. Returns the arrivals per second, the busiest second against the mean second of the refill
    (from the first arrival to the last), and the busiest second's share of all arrivals. Agents redialling in
    lockstep show as a few seconds holding most arrivals; jittered redials as a plateau."""
    per_second = {}
    for (t0, a), (t1, b) in zip(samples, samples[1:]):
        if b <= a or t1 <= t0:
            continue
        rate = (b - a) / (t1 - t0)
        t = t0
        while t < t1:
            edge = min(t1, int(t) + 1)
            per_second[int(t)] = per_second.get(int(t), 0) + rate * (edge - t)
            t = edge
    if not per_second:
        return None
    first, last = min(per_second), max(per_second)
    counts = [round(per_second.get(i, 0)) for i in range(last + 1)]
    total = sum(per_second.values())
    mean = total / (last - first + 1)
    peak = max(per_second.values())
    return {"per_second": counts, "total": round(total, 1), "busiest_second": round(peak), "mean_second": round(mean, 1),
            "peak_to_mean": round(peak / mean, 2), "busiest_second_share": round(peak / max(1, agents), 3)}


SERVICE_ADDRESS = "127.0.0.100"
SERVICE_CHAIN = "EDGETUNNEL-BENCH"


def route_service(ports):
    """The agents' Service address 127.0.0.100:10262 balanced over `ports` as kube-proxy's iptables mode does it:
    one DNAT rule per endpoint with `-m statistic --mode random --probability 1/k` (k: endpoints left), in a chain
    of its own in nat OUTPUT (the swarm runs on this host). Called again with fewer ports, it takes an endpoint
    out, as kube-proxy does when a pod stops being ready; with none it removes the chain."""
    def ipt(*args, check=True):
        return subprocess.run(["iptables", "-t", "nat", *args], capture_output=True, text=True, check=check)
    if ipt("-L", SERVICE_CHAIN, "-n", check=False).returncode != 0:
        ipt("-N", SERVICE_CHAIN)
        ipt("-A", "OUTPUT", "-d", SERVICE_ADDRESS, "-p", "tcp", "--dport", "10262", "-j", SERVICE_CHAIN)
    ipt("-F", SERVICE_CHAIN)
    if not ports:
        ipt("-D", "OUTPUT", "-d", SERVICE_ADDRESS, "-p", "tcp", "--dport", "10262", "-j", SERVICE_CHAIN)
        ipt("-X", SERVICE_CHAIN)
        return
    for index, port in enumerate(ports):
        left = len(ports) - index
        rule = ["-m", "statistic", "--mode", "random", "--probability", f"{1 / left:.5f}"] if left > 1 else []
        ipt("-A", SERVICE_CHAIN, "-p", "tcp", *rule, "-j", "DNAT", "--to-destination", f"127.0.0.1:{port}")


def probe_cost(server, count=5000, cpu=None):
    """The server's CPU per replica probe answered: `count` probes (connect, the question, the answer line, close),
    one after another from this process (on `cpu` if given), less the server's own CPU over as long while idle."""
    saved = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        idle_before, started = cpu_seconds(server["proc"]), time.monotonic()
        time.sleep(3)
        idle_per_s = (cpu_seconds(server["proc"]) - idle_before) / (time.monotonic() - started)
        before, started = cpu_seconds(server["proc"]), time.monotonic()
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", server["tunnel"]), timeout=5) as probe:
                probe.sendall(b"ETREPLICA?\n")
                answer = b""
                while not answer.endswith(b"\n"):
                    chunk = probe.recv(512)
                    if not chunk:
                        raise RuntimeError(f"the replica closed a probe without answering it: {answer!r}")
                    answer += chunk
        elapsed = time.monotonic() - started
        spent = cpu_seconds(server["proc"]) - before - idle_per_s * elapsed
    finally:
        os.sched_setaffinity(0, saved)
    return {"probes": count, "server_cpu_ms_per_probe": round(spent * 1000 / count, 3),
            "probes_per_s": round(count / elapsed)}


def measure_replica_swarm(lab, agents, replicas=3, pin=False):
    """N swarm agents dial one Service address balanced over `replicas` servers (`--server-count`): the time until
    every agent holds a tunnel to every replica (each replica counts N agents), each replica's memory per agent,
    and, after one replica restarts (SIGTERM, taken out of the Service, started again, put back), the time until
    every agent holds it again, with the other replicas' counts never dropping."""
    pki = make_pki(lab, f"replicas{agents}")
    # Every tunnel and probe goes to the one Service address, and ends on 127.0.0.1: more tunnels than the
    # default ephemeral range (28,232 ports) holds need the wider range for the run.
    # The servers' own ports stay reserved, so that a restarted replica can bind them again.
    port_range = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range")
    reserved = pathlib.Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
    saved_range, saved_reserved = port_range.read_text(), reserved.read_text()
    server_cpu, swarm_cpu = (("taskset", "-c", "0"), ("taskset", "-c", "1")) if pin else ((), ())
    servers = [start_server(lab, f"replica{agents}-{i}", pki, ("--server-count", str(replicas), "--server-id", f"r{i}", "--cert-ips", SERVICE_ADDRESS),
                            prefix=server_cpu)
               for i in range(replicas)]
    swarms = []
    try:
        if agents * replicas > 20000:
            reserved.write_text(",".join(str(s[key]) for s in servers for key in ("tunnel", "secure", "meta", "insecure")) + "\n")
            port_range.write_text("1024 65535\n")
        bases = [rss_mib(s["proc"]) for s in servers]
        route_service([s["tunnel"] for s in servers])
        # Each agent holds `replicas` sockets: swarm processes of at most 2,000 agents stay under a 20,000-descriptor
        # limit (this machine's hard limit, which root cannot raise here) even while every agent probes for a
        # missing replica with up to four connections at once.
        per_process = 2000
        swarms = [subprocess.Popen([*swarm_cpu, str(lab.bin / "edgetunnel"), "bench", "swarm", "--server", f"{SERVICE_ADDRESS}:10262",
                                    "--pki-dir", str(pki), "--agents", str(min(per_process, agents - first)),
                                    "--prefix", f"swarm-{first // per_process}-",
                                    # every agent from its own loopback address, as every edge node has its own:
                                    # the servers' per-source gate then meets the fleet as in production
                                    "--source-network", f"127.{64 + first // per_process}.0.0"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                  for first in range(0, agents, per_process)]
        start = time.monotonic()
        held = [wait_agents(s, agents, 600) for s in servers]
        fill_costs = costs(servers)
        fill_cpu = [cpu_seconds(s["proc"]) for s in servers]
        log(f"every agent holds every replica after {max(held) - start:.1f} s" if all(held) else "not every agent got every replica")
        all_held = max(held) - start if all(held) else None
        time.sleep(3)
        kib = [(rss_mib(s["proc"]) - base) * 1024 / agents for s, base in zip(servers, bases)]
        # A held replica's cost per probe it answers (every duplicate probe of a restart lands on one).
        probes = probe_cost(servers[0], cpu=1 if pin else None)
        # One replica restarts as a rolling update does it.
        victim = servers[-1]
        route_service([s["tunnel"] for s in servers[:-1]])
        others_before = costs(servers[:-1])
        stop(victim["proc"])
        restarted = time.monotonic()
        proc = lab.spawn(victim["args"], f"server-{victim['tag']}-again")
        # Where the refill's CPU goes: the returned replica (its side of every handshake), the others, the swarm.
        cpu_before = (cpu_seconds(proc), sum(cpu_seconds(s["proc"]) for s in servers[:-1]), sum(cpu_seconds(w) for w in swarms))
        wait_port(victim["meta"])
        route_service([s["tunnel"] for s in servers])
        lowest_other, back_at, cpu_spent = agents, None, None
        deadline = time.monotonic() + 600
        # A fresh process has counted nothing: the arrivals start from 0 at the restart, not from the first reading.
        timeline, next_mark, arrivals = [], restarted + 5, [(0.0, 0.0)]
        while time.monotonic() < deadline:
            # a replica too busy to answer its metrics within 2 s is not counted as one that lost its agents
            lowest_other = min([lowest_other] + [server_gauge(s, "edge_tunnel_server_agents", unread=agents)
                                                 for s in servers[:-1]])
            held_again = server_gauge(victim, "edge_tunnel_server_agents")
            registered = server_sum(victim, REGISTERED, tries=1)
            if registered is not None:  # an unread sample is left out, not read as none yet
                arrivals.append((time.monotonic() - restarted, registered))
            if time.monotonic() >= next_mark:  # how the returned replica fills: a tail or a line
                timeline.append([round(next_mark - restarted), int(held_again)])
                next_mark += 5
            if held_again >= agents:
                back_at = time.monotonic()
                break
            time.sleep(0.25)
        refill_costs = per_agent(costs([victim]), {}, agents)
        others_refill = per_agent(costs(servers[:-1]), others_before, agents)
        cpu_spent = [round(b - a, 1) for a, b in zip(cpu_before, (
            cpu_seconds(proc), sum(cpu_seconds(s["proc"]) for s in servers[:-1]), sum(cpu_seconds(w) for w in swarms)))]
        stop(proc)
    finally:
        for swarm in swarms:
            stop(swarm)
        route_service([])
        port_range.write_text(saved_range)
        reserved.write_text(saved_reserved if saved_reserved.strip() else "\n")
    return {"agents": agents, "replicas": replicas, "all_replicas_held_s": all_held,
            "kib_per_agent_per_replica": sum(kib) / len(kib), "server_rss_mib": max(rss_mib(s["proc"]) for s in servers[:-1]),
            "restarted_replica_held_again_s": back_at - restarted if back_at else None,
            "restarted_replica_agents_every_5_s": timeline,
            # what admitting the agents cost, per agent: the first fill over all replicas, and the refill on the
            # returned replica and on the other two (tunnels that missed keepalives in the storm, redialled)
            "first_fill_per_agent": per_agent(fill_costs, {}, agents),
            # the servers' CPU from start to the end of the first fill, per tunnel established (handshake, probes
            # answered, registration, keepalives meanwhile)
            "first_fill_server_cpu_ms_per_tunnel": round(sum(fill_cpu) * 1000 / fill_costs["registered"], 2)
            if fill_costs["registered"] else None,
            "probe_cost": probes,
            "pinned": pin,
            "refill_per_agent": {"returned_replica": refill_costs, "other_replicas": others_refill},
            "refill_arrivals": arrival_profile(arrivals, agents),
            # CPU seconds from the restart until the replica held every agent again, on a machine of `cores` cores
            "refill_cpu_s": {"returned_replica": cpu_spent[0], "other_replicas": cpu_spent[1], "swarm": cpu_spent[2],
                             "cores": os.cpu_count()} if cpu_spent else None,
            "lowest_count_on_other_replicas": lowest_other}
