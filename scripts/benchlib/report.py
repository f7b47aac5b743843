"""The results: summaries (median, min, max of the runs), the Markdown tables, bench.json and bench.md, and
docs/benchmarks.md."""
import datetime
import json
import os
import pathlib
import platform
import statistics

from benchlib import ROOT
from benchlib.lab import log


def summarize(values):
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def fmt(summary, digits=2):
    if summary is None:
        return "—"
    return f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}–{summary['max']:.{digits}f})"


def summaries(raw, setups, footprints, swarms, swarm_sizes):
    """The runs of the suite summarized: ({contender: {figure: summary}}, {"setup", "footprint", "swarm"})."""
    results, extra = {}, {}
    for contender, r in raw.items():
        results[contender] = {
            "iperf3_1_stream_gbit_s": summarize(r["iperf1"]),
            "iperf3_1_stream_relay_cpu_s_per_gb": summarize(r["iperf1_cpu"]),
            "iperf3_8_streams_gbit_s": summarize(r["iperf8"]),
            "wrk_1k_rps": summarize([x["rps"] for x in r["wrk1k"]]),
            "wrk_1k_p50_ms": summarize([x["p50_ms"] for x in r["wrk1k"]]),
            "wrk_1k_p99_ms": summarize([x["p99_ms"] for x in r["wrk1k"]]),
            "wrk_1k_relay_cpu_us": summarize([x["relay_us"] for x in r["wrk1k"] if "relay_us" in x]),
            "wrk_1m_rps": summarize([x["rps"] for x in r["wrk1m"]]),
            "wrk_1m_p99_ms": summarize([x["p99_ms"] for x in r["wrk1m"]]),
            "errors": [x["errors"] for x in r["wrk1k"] + r["wrk1m"] if x["errors"]],
        }
    extra["setup"] = {
        path: {key: summarize([r[path][k] for r in setups]) for key, k in
               (("streams_per_second", "streams_per_second"), ("failures", "failures"))}
        | {"p50_ms": summarize([r[path]["connect_to_200_ms"]["p50"] for r in setups]),
           "p99_ms": summarize([r[path]["connect_to_200_ms"]["p99"] for r in setups])}
        for path in ("uds", "tls")}
    extra["footprint"] = {key: summarize([f[key] for f in footprints]) for key in footprints[0]}
    extra["swarm"] = {
        str(n): {key: summarize([w[key] for w in swarms if w["agents"] == n and w[key] is not None] or [float("nan")])
                 for key in swarms[0] if key != "agents"}
        for n in swarm_sizes}
    return results, extra


def publish(results, extra, args):
    """Writes bench.json and bench.md to --output, prints the tables, and with --update-docs puts them into
    docs/benchmarks.md."""
    machine = f"{platform.node()}: {os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = render(results, extra, args, machine, date)
    out = pathlib.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"machine": machine, "date": date, "seconds": args.seconds,
                                                 "runs": args.runs, "results": results, **extra}, indent=2))
    (out / "bench.md").write_text(table)
    print(table)
    if args.update_docs:
        docs = ROOT / "docs" / "benchmarks.md"
        text = docs.read_text()
        start, end = "<!-- bench:start -->", "<!-- bench:end -->"
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        docs.write_text(f"{before}{start}\n{table}\n{end}{after}")
        log(f"updated {docs}")


def render(results, extra, args, machine, date):
    ssh_default = results.get("ssh -R", {})
    ssh_tuned = results.get("ssh -R tuned", {})
    socat = results.get("socat", {})
    lines = [f"Measured {date} on {machine}; {args.runs} run(s) of {args.seconds} s each, interleaved; "
             "median (min–max).", "",
             "| contender | iperf3 1 stream Gbit/s | relay CPU s per GB | iperf3 8 streams Gbit/s | wrk 1 KiB req/s | "
             "1 KiB p50 ms | 1 KiB p99 ms | relay CPU µs per 1 KiB req | wrk 1 MiB req/s | 1 MiB p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {fmt(r['iperf3_1_stream_gbit_s'])} | "
                     f"{fmt(r.get('iperf3_1_stream_relay_cpu_s_per_gb'))} | {fmt(r['iperf3_8_streams_gbit_s'])} | "
                     f"{fmt(r['wrk_1k_rps'], 0)} | {fmt(r['wrk_1k_p50_ms'])} | {fmt(r['wrk_1k_p99_ms'])} | "
                     f"{fmt(r.get('wrk_1k_relay_cpu_us'), 1)} | {fmt(r['wrk_1m_rps'], 0)} | {fmt(r['wrk_1m_p99_ms'])} |")
    lines += ["", "Ratios (median against median):", ""]

    def ratio(r, other, key):
        if not r.get(key) or not other.get(key):
            return "—"
        value = r[key]["median"] / other[key]["median"]
        return f"{value:.2f}×" if value >= 0.1 else f"{value:.3f}×"

    for name, r in results.items():
        if name in ("direct", "socat", "ssh -R", "ssh -R tuned") or not ssh_default or not socat:
            continue
        key = "iperf3_1_stream_gbit_s"
        stream = (f"one stream {ratio(r, ssh_default, key)} ssh -R, {ratio(r, ssh_tuned, key)} ssh -R tuned, "
                  f"{ratio(r, socat, key)} socat, relay CPU per GB "
                  f"{ratio(r, ssh_tuned, 'iperf3_1_stream_relay_cpu_s_per_gb')} ssh -R tuned's; " if r.get(key) else "")
        lines.append(f"- {name}: {stream}1 KiB req/s {ratio(r, ssh_default, 'wrk_1k_rps')} ssh -R, "
                     f"{ratio(r, ssh_tuned, 'wrk_1k_rps')} ssh -R tuned; 1 KiB p99 "
                     f"{ratio(r, socat, 'wrk_1k_p99_ms')} socat's, {ratio(r, ssh_tuned, 'wrk_1k_p99_ms')} ssh -R tuned's; "
                     f"relay CPU per 1 KiB request {ratio(r, ssh_tuned, 'wrk_1k_relay_cpu_us')} ssh -R tuned's")
    grpc, uds = results.get("EdgeTunnel (forward → gRPC socket)"), results.get("EdgeTunnel (forward → Unix socket CONNECT)")
    if grpc and uds:
        lines.append(f"- EdgeTunnel (forward → gRPC socket) against the Unix socket CONNECT path (goal: at least 0.8×): "
                     f"one stream {ratio(grpc, uds, 'iperf3_1_stream_gbit_s')}, 1 KiB req/s {ratio(grpc, uds, 'wrk_1k_rps')}, "
                     f"1 KiB p99 {ratio(grpc, uds, 'wrk_1k_p99_ms')}, 1 MiB req/s {ratio(grpc, uds, 'wrk_1m_rps')}")
    errors = {name: r["errors"] for name, r in results.items() if r["errors"]}
    if errors:
        lines += ["", f"wrk reported errors: {errors}"]
    if "setup" in extra:
        lines += ["", "Stream set-up through one agent (`edgetunnel bench streams`, 50 at a time; the TLS figure "
                  "includes a TCP connect and TLS handshake per stream):", "",
                  "| path | new streams/s | CONNECT→200 p50 ms | p99 ms | failed |", "|---|---|---|---|---|"]
        for path, label in (("uds", "Unix socket"), ("tls", "TLS, secure port")):
            r = extra["setup"][path]
            lines.append(f"| {label} | {fmt(r['streams_per_second'], 0)} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | "
                         f"{fmt(r['failures'], 0)} |")
    if "footprint" in extra:
        f = extra["footprint"]
        few, many = int(f["streams_few"]["median"]), int(f["streams_many"]["median"])
        lines += ["", "Footprint (RSS; per stream = growth / streams held idle):", "",
                  "| measure | value |", "|---|---|",
                  f"| idle agent RSS MiB | {fmt(f['idle_agent_mib'], 1)} |",
                  f"| … of which its own (anonymous) memory, not mapped code MiB | {fmt(f.get('idle_agent_anon_mib'), 1)} |",
                  f"| idle server RSS MiB | {fmt(f['idle_server_mib'], 1)} |",
                  f"| agent KiB per idle stream ({few} streams) | {fmt(f['agent_kib_per_stream_few'], 1)} |",
                  f"| server KiB per idle stream ({few} streams) | {fmt(f['server_kib_per_stream_few'], 1)} |",
                  f"| agent KiB per idle stream ({many} streams) | {fmt(f['agent_kib_per_stream_many'], 1)} |",
                  f"| server KiB per idle stream ({many} streams) | {fmt(f['server_kib_per_stream_many'], 1)} |",
                  f"| server CPU s per GB (one stream, Unix socket) | {fmt(f['server_cpu_s_per_gb'])} |",
                  f"| agent CPU s per GB | {fmt(f['agent_cpu_s_per_gb'])} |",
                  f"| `edgetunnel forward` CPU s per GB | {fmt(f['forward_cpu_s_per_gb'])} |"]
    if "swarm" in extra:
        lines += ["", "Swarm (`edgetunnel bench swarm`: N agents, each its own node certificate, one process, "
                  "against a fresh server):", "",
                  "| agents | all connected after s | server RSS MiB | KiB per agent | idle server CPU % of a core | "
                  "all back after a server restart s |", "|---|---|---|---|---|---|"]
        for n, w in extra["swarm"].items():
            lines.append(f"| {n} | {fmt(w['connect_s'], 1)} | {fmt(w['server_rss_mib'], 0)} | "
                         f"{fmt(w['kib_per_agent'], 1)} | {fmt(w['idle_cpu_percent'], 1)} | {fmt(w['reconnect_s'], 1)} |")
    return "\n".join(lines) + "\n"


def resume_ab_table(found):
    rows = [("iperf3, 1 stream, TLS CONNECT (Gbit/s)", "iperf1", 2), ("Host-routed 1 KiB (req/s)", "wrk1k", 0),
            ("Host-routed 1 MiB (req/s)", "wrk1m", 0)]
    lines = ["| median (min–max) | resumable | not resumable | ratio |", "|---|---|---|---|"]
    for label, key, digits in rows:
        a, b = found["resumable"][key], found["not resumable"][key]
        lines.append(f"| {label} | {fmt(a, digits)} | {fmt(b, digits)} | {a['median'] / b['median']:.2f} |")
    return "\n".join(lines)
