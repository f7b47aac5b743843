"""The server and agent as an unprivileged user with no capabilities, as a container runs them (the suite runs as
root, which hid this). A socket option named at the wrong level asked for SO_DEBUG instead of TCP_NODELAY on
every accepted connection: root may set it, anyone else gets EACCES, and the server closed every caller."""
import os
import pathlib
import shutil
import tempfile

import pytest

from conftest import BIN, run
from support.harness import Cluster, free_port, http_get, wait_until

NOBODY = 65534


def as_nobody(*args):
    return ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--", *[str(a) for a in args]]


@pytest.fixture
def lab():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (to drop to another user) and setpriv")
    folder = pathlib.Path(tempfile.mkdtemp(prefix="edgetunnel-unprivileged-", dir="/tmp"))
    folder.chmod(0o755)  # pytest's own folders are root's alone
    c = Cluster(folder)
    try:
        yield c
    finally:
        c.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_an_unprivileged_server_and_agent_carry_requests(lab):
    token = lab.token()
    for path in [lab.tmp, *lab.tmp.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    agent_dir = lab.tmp / "agent-edge-1"
    agent_dir.mkdir()
    os.chown(agent_dir, NOBODY, NOBODY)
    port = lab.start_edge_service()
    lab.server = lab.spawn(as_nobody(
        BIN / "edge-tunnel-server", "--pki-dir", lab.pki, "--bind-address", "127.0.0.1", "--tunnel-port",
        lab.ports["tunnel"], "--secure-port", lab.ports["secure"], "--meta-port", lab.ports["meta"],
        "--insecure-port", lab.ports["insecure"]), "server")
    wait_until(lambda: http_get(lab.meta_url("/readyz"))[0] == 200, 20, "the unprivileged server ready")
    meta = free_port()
    lab.spawn(as_nobody(
        BIN / "edge-tunnel-agent", "--node-name", "edge-1", "--server-address", f"127.0.0.1:{lab.ports['tunnel']}",
        "--pki-dir", agent_dir, "--meta-port", meta, "--bootstrap-token", token, "--ca-cert-hash", lab.ca_hash,
        "--allow", f"127.0.0.1:{port}"), "agent-edge-1")
    wait_until(lambda: http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200, 20, "the unprivileged agent registered")
    answer = lab.curl(f"http://edge-1:{port}/hello", check=True)
    assert answer.stdout == "hello from the edge\n"
    # The insecure port and the Host route too.
    plain = run("curl", "-sS", "--max-time", "10", "-H", f"Host: edge-1:{port}",
                f"http://127.0.0.1:{lab.ports['insecure']}/hello")
    assert plain.stdout == "hello from the edge\n", plain
