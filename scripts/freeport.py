"""Free TCP ports for the test harness and the benchmark suite."""
import os
import pathlib
import random
import socket

_handed_out = set()
LOWEST = 10000


def _range():
    """The ports to draw from: from LOWEST up to the kernel's ephemeral range (a port the kernel picked by a bind to 0
    can be given to some process's outgoing connection before the process under test binds it). Under pytest-xdist
    each worker draws from its own slice, and so do the scripts it runs (they inherit its environment): a port one
    worker handed out, to be bound a moment later or to stay closed on purpose, is never another worker's."""
    low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    first, last = LOWEST, max(LOWEST + 1, low - 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if worker.startswith("gw") and worker[2:].isdigit() and count > 1:
        size = (last - first + 1) // count
        if size >= 1000:
            first += int(worker[2:]) % count * size
            last = first + size - 1
    return first, last


def free_port():
    """A free port below the kernel's ephemeral range (see _range). Never the same port twice per run of a process."""
    first, last = _range()
    for _ in range(1000):
        port = random.randint(first, last)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {first}-{last}, below the ephemeral range")
