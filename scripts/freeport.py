"""Free TCP ports for the test harness and the benchmark suite."""
import pathlib
import random
import socket

_handed_out = set()


def free_port():
    """A free port below the kernel's ephemeral range: a port the kernel picked (bind to 0) can be given to some
    process's outgoing connection before the process under test binds it. Never the same port twice per run."""
    low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = random.randint(10000, max(10001, low - 1))
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")
