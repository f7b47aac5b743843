"""Claims of SECURITY.md that had no test (issue 29, "Claims with no test"), each held to what the docs say against
the real binaries: real agents or raw agents with real certificates, real callers. Helpers: support/claims.py.

Where a claim lives:
- 64 lookups: SECURITY.md "Limits"; `NameLookups`.
- The `nodes.json` lock: SECURITY.md "Identity"; `NodeStore.withFileLock`.
- Secret mode 0440: SECURITY.md "Several replicas"; `Manifests` (the CA volume), the server's `--ca-dir`.
- Revocation within two seconds: SECURITY.md "Identity"; `TunnelServer.watchIdentities`, `AgentSession.cutOff`.
The resuming claims are in test_claims.py, the ports, Kubernetes objects, replicas, routing and threads in
test_claims_operations.py.
"""
import fcntl
import json
import os
import pathlib
import random
import shutil
import socket
import ssl
import subprocess
import tempfile
import time

import pytest
import yaml

from conftest import BIN, run
from support.claims import OPEN, OPEN_FAIL, PING, PONG, REFUSED, registered, in_private_mounts, needs_mount_namespaces
from support.claims import cluster  # noqa: F401  (fixture)
from support.harness import FakeServer, frame, free_port, http_get, read_frame, wait_until


# ---------------------------------------------------------------------------------------------------------------
# Name lookups on the agent.

class SilentDNS:
    """A DNS server that never answers, on a loopback address of its own: a lookup through it waits its timeout."""

    def __init__(self, folder):
        self.address = f"127.53.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.address, 53))
        self.resolv = pathlib.Path(folder) / "resolv.conf"
        self.resolv.write_text(f"nameserver {self.address}\noptions timeout:30 attempts:1\n")

    def close(self):
        self.sock.close()


def test_at_most_64_name_lookups_wait_on_the_agent(cluster):
    """SECURITY.md, "Limits": the agent resolves a name target "on one serial queue, at most 64 lookups waiting ...
    503 past 64 lookups waiting". A real agent whose DNS server never answers (its own /etc/resolv.conf) gets 70
    OPENs for an allowed name from its server (a fake with the real serving certificate): 64 wait for their lookup,
    and the other 6 are answered at once with OPEN_FAIL 503 and the reason."""
    needs_mount_namespaces()
    c = cluster
    dns = SilentDNS(c.tmp)
    try:
        fake = FakeServer.replacing(c, "edge-1")
        meta = free_port()
        agent = c.spawn(in_private_mounts([(dns.resolv, "/etc/resolv.conf")], [
            BIN / "edge-tunnel-agent", "--node-name", "edge-1", "--server-address", f"127.0.0.1:{c.ports['tunnel']}",
            "--pki-dir", c.tmp / "agent-edge-1", "--meta-port", meta, "--allow", "slow.example.com:80"]),
            "agent-edge-1")
        agent.meta = meta
        tls = fake.accept()
        ids = list(range(1, 2 * 70, 2))
        tls.sendall(b"".join(frame(OPEN, i, (1 << 20).to_bytes(4, "big") + b"slow.example.com:80") for i in ids))
        failed = {}
        tls.settimeout(0.2)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                frame_type, stream_id, payload = read_frame(tls)
            except (socket.timeout, ssl.SSLError):
                continue
            if frame_type == PING:
                tls.sendall(frame(PONG, 0, payload))
            else:
                assert frame_type == OPEN_FAIL, (frame_type, stream_id, payload)
                failed[stream_id] = json.loads(payload)
        print(f"{len(failed)} refused at once: {sorted(failed)}")
        assert sorted(failed) == ids[64:], sorted(failed)
        for answer in failed.values():
            assert answer["code"] == 503 and "too many name lookups are waiting" in answer["reason"], answer
        tls.close()  # not resumable: the 64 waiting streams end with it
        fake.close()
        agent.stop()
    finally:
        dns.close()


# ---------------------------------------------------------------------------------------------------------------
# The join state and the CA on disk; revocation.

def nodes_json(c):
    path = c.pki / "nodes.json"
    return {n["name"]: n for n in json.loads(path.read_text())["nodes"]} if path.exists() else {}


def test_changes_to_nodes_json_wait_for_its_lock(cluster):
    """SECURITY.md, "Identity": "Changes to nodes.json take an exclusive flock, so an operator's revoke and a server's
    join never overwrite each other". While another holder has the lock (nodes.json.lock, as a server in the middle of
    recording a join holds it), `edgetunnel node revoke` waits and nodes.json stays as it was, and so does a join
    through the server; once the lock is released, both are written, neither lost."""
    c = cluster
    c.start_server()
    c.start_agent("edge-1").stop()
    before = (c.pki / "nodes.json").read_bytes()
    with open(c.pki / "nodes.json.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        revoke = subprocess.Popen([str(BIN / "edgetunnel"), "node", "revoke", "--pki-dir", str(c.pki), "edge-1"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        joining = c.start_agent("edge-2", ips=("127.0.0.2",), wait=False)
        time.sleep(2)  # the time a revoke and a join take many times over: held up by the lock, they are still waiting
        assert revoke.poll() is None, f"the revoke did not wait for the lock: {revoke.communicate()}"
        assert (c.pki / "nodes.json").read_bytes() == before
        assert not (c.tmp / "agent-edge-2" / "agent.crt").exists()
        fcntl.flock(lock, fcntl.LOCK_UN)
    out, err = revoke.communicate(timeout=20)
    assert revoke.returncode == 0, err
    wait_until(lambda: http_get(f"http://127.0.0.1:{joining.meta}/readyz")[0] == 200, 20, "edge-2 joined")
    nodes = nodes_json(c)
    assert nodes["edge-1"].get("revoked") and nodes["edge-2"].get("joined") and not nodes["edge-2"].get("revoked"), \
        nodes


SECRET_GROUP = 65532


def test_the_ca_secret_is_mounted_0440_and_the_server_runs_from_it(cluster):
    """SECURITY.md, "Several replicas": "The CA key reaches every replica from a Secret mounted read-only (mode 0440,
    group 65532)". The manifests render the Secret volume with defaultMode 0440, mounted read-only, in a pod of user
    and group 65532 with fsGroup 65532. Mounted as the kubelet would (files root's, group fsGroup, that mode), the
    server run as that user from the manifests' server.yaml serves, issues its own certificates into its state
    folder, signs an agent's join with the CA key, and leaves the CA folder as it was."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (to own files as another user and run as it) and setpriv")
    c = cluster
    docs = [d for d in yaml.safe_load_all(run(BIN / "edgetunnel", "manifests", "--mode", "internet", "--image", "x",
                                               "--server-address", "a:10262").stdout) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "edge-tunnel-server")
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "ca")
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "ca")
    assert volume["secret"]["defaultMode"] == 0o440 and mount["readOnly"] is True, (volume, mount)
    security = pod["securityContext"]
    assert security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == SECRET_GROUP, security
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap"
                                 and "server.yaml" in d.get("data", {}))["data"]["server.yaml"])
    assert config["caDir"] == mount["mountPath"], config

    # The Secret as the kubelet mounts it: the files root's, their group fsGroup, the volume's mode.
    folder = pathlib.Path(tempfile.mkdtemp(prefix="edgetunnel-secret-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        secret, state = folder / "ca", folder / "state"
        secret.mkdir()
        state.mkdir(mode=0o700)
        os.chown(state, SECRET_GROUP, SECRET_GROUP)
        for name in ("ca.crt", "ca.key"):
            shutil.copy(c.pki / name, secret / name)
            os.chown(secret / name, 0, security["fsGroup"])
            (secret / name).chmod(volume["secret"]["defaultMode"])
        secret.chmod(0o755)
        before = {p.name: (p.read_bytes(), p.stat().st_mode) for p in secret.iterdir()}
        config.update(caDir=str(secret), pkiDir=str(state), stateDir=str(state), serverCount=1)
        for key in ("leaseNamespace", "addressService", "checkNodeObjects", "joinStateNamespace"):
            config.pop(key, None)  # the Kubernetes API is not here
        (folder / "server.yaml").write_text(yaml.safe_dump(config))
        os.chown(folder / "server.yaml", 0, 0)
        c.server = c.spawn([
            "setpriv", "--reuid", security["runAsUser"], "--regid", security["runAsGroup"], "--groups",
            security["fsGroup"], "--inh-caps=-all", "--bounding-set=-all", "--", BIN / "edge-tunnel-server",
            "--config", folder / "server.yaml", "--bind-address", "127.0.0.1", "--tunnel-port", c.ports["tunnel"],
            "--secure-port", c.ports["secure"], "--meta-port", c.ports["meta"], "--insecure-port",
            c.ports["insecure"]], "server")
        wait_until(lambda: http_get(c.meta_url("/readyz"))[0] == 200, 20, "the server ready from the Secret's CA")
        assert (state / "server.crt").exists()
        token = run(BIN / "edgetunnel", "token", "create", "--pki-dir", state,
                    "--node-cidr", "127.0.0.0/8").stdout.strip()
        for path in state.iterdir():
            os.chown(path, SECRET_GROUP, SECRET_GROUP)
        meta = free_port()
        c.spawn([BIN / "edge-tunnel-agent", "--node-name", "edge-1", "--node-ip", "127.0.0.1", "--server-address",
                 f"127.0.0.1:{c.ports['tunnel']}", "--pki-dir", c.tmp / "agent-edge-1", "--meta-port", meta,
                 "--bootstrap-token", token, "--ca-cert-hash", c.ca_hash], "agent-edge-1")
        wait_until(lambda: http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200, 20, "the agent joined")
        issuer = run("openssl", "verify", "-CAfile", secret / "ca.crt", c.tmp / "agent-edge-1" / "agent.crt")
        assert issuer.stdout.strip().endswith(": OK"), issuer.stdout
        c.server.stop()
        assert {p.name: (p.read_bytes(), p.stat().st_mode) for p in secret.iterdir()} == before
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# The server re-reads nodes.json every two seconds and refuses a revoked node's connections at once (SECURITY.md). It
# closes a connection 200 ms after its REFUSED ("a refused connection ... closed 200 ms later", SECURITY.md's table).
REREAD_S, CLOSE_AFTER_REFUSED_S = 2.0, 0.2
SCHEDULING_SLACK_S = 0.1  # a timer of a busy 2-core machine's event loop may fire this much late


def revoke_and_watch(c, node, start_at=None):
    """A raw agent of `node` holds a registered tunnel; `edgetunnel node revoke` runs (from `start_at`, wall clock).
    Returns the wall-clock times of the start of the command, of nodes.json's write (its mtime: the revocation is
    in force from then), of the REFUSED the tunnel gets, and of its end."""
    _, tls = registered(c, node, version=2)
    while start_at is not None and time.time() < start_at:
        time.sleep(0.001)
    started = time.time()
    run(BIN / "edgetunnel", "node", "revoke", "--pki-dir", c.pki, node)
    written = (c.pki / "nodes.json").stat().st_mtime_ns / 1e9
    refused = closed = None
    tls.settimeout(5)
    try:
        while True:
            frame_type, _, payload = read_frame(tls)
            if frame_type == REFUSED:
                refused = time.time()
                assert "revoked" in json.loads(payload)["reason"], payload
            elif frame_type == PING:
                tls.sendall(frame(PONG, 0, payload))
    except (ConnectionError, ssl.SSLError, OSError):
        closed = time.time()
    tls.close()
    assert refused is not None and closed is not None, (refused, closed)
    return started, written, refused, closed


def test_a_revoked_nodes_live_tunnel_is_refused_within_two_seconds_and_closed_200_ms_later(cluster):
    """SECURITY.md, "Identity": a revoked node's live connections are "closed within two seconds (the server re-reads
    nodes.json every two seconds ...)". Measured from nodes.json's write by `edgetunnel node revoke` to the REFUSED a
    raw agent's registered tunnel gets, and to the connection's end. The revocations are timed to be written just
    after one of the server's re-reads, the worst moment: the REFUSED then comes almost two seconds later, and the
    connection ends 200 ms after it. So the REFUSED holds the documented two seconds; the close takes up to 2.2 s
    (measured 2.09-2.13 s), which the sentence does not allow: see issue 29's report."""
    c = cluster
    c.start_server()
    started, written, refused, _ = revoke_and_watch(c, "edge-0")
    latency, tick = written - started, refused  # the command's start-to-write time; a re-read's moment
    results = []
    for index in range(1, 3):
        # The write aimed 80 ms after a re-read at least a second ahead (the re-reads are 2 s apart).
        after = tick + REREAD_S * (int((time.time() - tick + 1.0) / REREAD_S) + 1)
        started, written, refused, closed = revoke_and_watch(c, f"edge-{index}", start_at=after + 0.08 - latency)
        latency, tick = written - started, refused
        results.append((written - after, refused - written, closed - written))
    print("revocations written after a re-read by / REFUSED / closed: "
          + ", ".join(f"{w:+.3f}/{r:.3f}/{e:.3f} s" for w, r, e in results))
    for _, refused_after, closed_after in results:
        assert refused_after <= REREAD_S + SCHEDULING_SLACK_S, results
        assert closed_after - refused_after <= CLOSE_AFTER_REFUSED_S + SCHEDULING_SLACK_S, results
    # The worst moment was hit: a revocation written just after a re-read waited for the next one.
    assert max(refused_after for _, refused_after, _ in results) >= 1.5, results
