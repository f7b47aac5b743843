"""The parts of the benchmark suite that scripts/bench runs, by concern: `lab` (processes, ports, the PKI, a server
and agent pair), `contenders` (socat, ssh -R, the EdgeTunnel forwards and which processes relay each contender's
traffic), `measure` (iperf3, wrk, CPU accounting, stream set-up, footprint, the resume A/B), `swarm` (agent swarms
against one server and against replicas) and `report` (summaries, the Markdown tables, docs/benchmarks.md).

Processes are started and stopped by the test harness's `Processes` (IntegrationTests/support/harness.py), which
is why importing this package puts IntegrationTests/ (and scripts/, for freeport) on sys.path."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
for _folder in (ROOT / "IntegrationTests", ROOT / "scripts"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))
