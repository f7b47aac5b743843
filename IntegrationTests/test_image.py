"""The image `scripts/build-image` makes, run as a user would run it: built with podman from the binaries under
test (pulling nothing), a server container and an agent container on the host's network, a request through the
tunnel, both processes unprivileged (uid 65532), and `podman stop` ending both with exit code 0 (PID 1 handles
SIGTERM and drains). Podman on these machines needs runc and raised rlimits (see scripts/build-image)."""
import os
import pathlib
import shutil
import subprocess
import tempfile
import uuid

import pytest

from conftest import BIN, ROOT, run
from support.harness import Cluster, free_port, http_get, wait_until

IMAGE_USER = 65532
RUN_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
             "--network", "host"]


def podman(*args, check=True):
    return run("podman", *[str(a) for a in args], check=check)


@pytest.fixture
def image():
    if shutil.which("podman") is None or os.geteuid() != 0:
        pytest.skip("needs podman (scripts/test installs it) and root")
    tag = f"localhost/edgetunnel:e2e-{uuid.uuid4().hex[:8]}"
    built = subprocess.run([ROOT / "scripts" / "build-image", "--bin-dir", BIN, "--tag", tag],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    try:
        yield tag
    finally:
        podman("rmi", "-f", tag, check=False)


@pytest.fixture
def lab():
    folder = pathlib.Path(tempfile.mkdtemp(prefix="edgetunnel-image-", dir="/tmp"))
    folder.chmod(0o755)
    c = Cluster(folder)
    names = []
    c.containers = names
    try:
        yield c
    finally:
        for name in names:
            logs = podman("logs", name, check=False)
            (folder / f"{name}.log").write_text(logs.stdout + logs.stderr)
            podman("rm", "-f", "-t", "0", name, check=False)
        c.close()
        shutil.rmtree(folder, ignore_errors=True)


def start(lab, image, name, *args):
    container = f"edgetunnel-{name}-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", container, *RUN_FLAGS, *args)
    lab.containers.append(container)
    return container


def process_uid(container):
    pid = podman("inspect", "-f", "{{.State.Pid}}", container).stdout.strip()
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def test_the_image_runs_a_server_and_an_agent_that_carry_a_request(image, lab):
    token = lab.token()
    agent_dir = lab.tmp / "agent-edge-1"
    agent_dir.mkdir()
    for path in [lab.pki, *lab.pki.rglob("*"), agent_dir]:
        os.chown(path, IMAGE_USER, IMAGE_USER)
    port = lab.start_edge_service()

    server = start(lab, image, "server", "-v", f"{lab.pki}:/var/lib/edge-tunnel-server/pki", image,
                   "--bind-address", "127.0.0.1", "--tunnel-port", lab.ports["tunnel"],
                   "--secure-port", lab.ports["secure"], "--meta-port", lab.ports["meta"],
                   "--insecure-port", lab.ports["insecure"])
    wait_until(lambda: http_get(lab.meta_url("/readyz"))[0] == 200, 30, "the server container ready")
    meta = free_port()
    agent = start(lab, image, "agent", "-v", f"{agent_dir}:/var/lib/edge-tunnel-agent/pki",
                  "--entrypoint", "edge-tunnel-agent", image, "--node-name", "edge-1",
                  "--server-address", f"127.0.0.1:{lab.ports['tunnel']}", "--node-ip", "127.0.0.1",
                  "--meta-port", meta, "--bootstrap-token", token, "--ca-cert-hash", lab.ca_hash,
                  "--allow", f"127.0.0.1:{port}")
    wait_until(lambda: http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200, 30, "the agent container registered")

    answer = lab.curl(f"http://edge-1:{port}/hello", check=True)
    assert answer.stdout == "hello from the edge\n"
    # The default state folders are where the processes wrote, as the image's own user, not root.
    assert (agent_dir / "agent.crt").stat().st_uid == IMAGE_USER
    assert process_uid(server) == IMAGE_USER and process_uid(agent) == IMAGE_USER
    assert podman("image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip() == f"{IMAGE_USER}:{IMAGE_USER}"

    # SIGTERM to PID 1 (podman stop) drains and exits 0, well before podman's 20-s kill.
    for container in (agent, server):
        podman("stop", "-t", "20", container)
        assert podman("inspect", "-f", "{{.State.ExitCode}}", container).stdout.strip() == "0", container
