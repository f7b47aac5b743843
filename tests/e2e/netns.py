"""Network namespaces for topology tests: created by the test, deleted afterwards even when the test fails.

Under CI (CI=true, root) failing to create a namespace is a test failure; elsewhere the test is skipped with
the reason, never passed silently.
"""
import contextlib
import os
import subprocess
import uuid

import pytest


def sh(*args, check=True):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check, timeout=60)


def require_netns():
    probe = f"etprobe{uuid.uuid4().hex[:6]}"
    result = sh("ip", "netns", "add", probe, check=False)
    if result.returncode == 0:
        sh("ip", "netns", "del", probe, check=False)
        return
    message = f"cannot create network namespaces here: {result.stderr.strip()}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def two_hosts(prefix="10.231.7"):
    """Two namespaces joined by a veth pair: (name_a, ip_a, name_b, ip_b)."""
    require_netns()
    tag = uuid.uuid4().hex[:6]
    a, b = f"eta{tag}", f"etb{tag}"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        sh("ip", "link", "set", f"va{tag}", "netns", a)
        sh("ip", "link", "set", f"vb{tag}", "netns", b)
        for ns, dev, ip in [(a, f"va{tag}", f"{prefix}.1"), (b, f"vb{tag}", f"{prefix}.2")]:
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield a, f"{prefix}.1", b, f"{prefix}.2"
    finally:
        sh("ip", "netns", "del", a, check=False)
        sh("ip", "netns", "del", b, check=False)
