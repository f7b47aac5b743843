"""Replicas sharing one PKI as the manifests deploy them: the CA from a read-only folder (the Secret), each
replica's own serving certificate in a folder of its own (the emptyDir), and the join state (tokens.json,
nodes.json) in one shared folder (the claim). A node that joined through one replica is known to the other: it
connects there, and a second join of its name there is refused."""
import hashlib
import json
import shutil
import types

from conftest import BIN, run
from support.harness import Cluster, frame, free_port, http_get, wait_until
from support.hostile import attacker_tunnel, csr_for, refusal


def snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in folder.iterdir()}


def test_two_replicas_share_the_ca_and_the_join_state_and_keep_their_own_serving_certificates(tmp_path):
    c = Cluster(tmp_path)
    try:
        ca_dir = tmp_path / "ca"
        ca_dir.mkdir()
        for name in ("ca.crt", "ca.key"):
            shutil.move(c.pki / name, ca_dir / name)
        c.ca = ca_dir / "ca.crt"
        before = snapshot(ca_dir)
        token = c.token()

        c.start_server("--ca-dir", ca_dir, "--state-dir", tmp_path / "state-a")
        b = types.SimpleNamespace(ports={name: free_port() for name in c.ports}, tls_context=c.tls_context)
        c.spawn([BIN / "edge-tunnel-server", "--pki-dir", c.pki, "--ca-dir", ca_dir, "--state-dir", tmp_path / "state-b",
                 "--bind-address", "127.0.0.1", "--server-id", "replica-b", "--tunnel-port", b.ports["tunnel"],
                 "--secure-port", b.ports["secure"], "--meta-port", b.ports["meta"],
                 "--insecure-port", b.ports["insecure"]], "server-b")
        wait_until(lambda: http_get(f"http://127.0.0.1:{b.ports['meta']}/readyz")[0] == 200, 20, "replica b ready")

        # Each replica issued its own serving certificate from the shared CA, in its own folder; the CA folder and
        # the shared folder got none.
        serials = set()
        for replica in ("state-a", "state-b"):
            certificate = tmp_path / replica / "server.crt"
            run("openssl", "verify", "-CAfile", c.ca, certificate)
            serials.add(run("openssl", "x509", "-noout", "-serial", "-in", certificate).stdout)
        assert len(serials) == 2
        assert not (c.pki / "server.crt").exists()
        assert snapshot(ca_dir) == before

        # edge-1 joins through replica a with the token from the shared folder ...
        port = c.start_edge_service()
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}")
        nodes = json.loads((c.pki / "nodes.json").read_text())["nodes"]
        assert [n["name"] for n in nodes if n.get("joined")] == ["edge-1"]
        # ... then connects to replica b with the certificate it got, and callers reach it there.
        meta = free_port()
        c.spawn([BIN / "edge-tunnel-agent", "--node-name", "edge-1", "--server-address", f"127.0.0.1:{b.ports['tunnel']}",
                 "--pki-dir", tmp_path / "agent-edge-1", "--meta-port", meta, "--node-ip", "127.0.0.1",
                 "--allow", f"127.0.0.1:{port}"], "agent-edge-1-on-b")
        wait_until(lambda: http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200, 20, "edge-1 on replica b")
        through_b = run("curl", "-sS", "--max-time", "10", "-H", f"Host: edge-1:{port}",
                        f"http://127.0.0.1:{b.ports['insecure']}/hello")
        assert through_b.stdout == "hello from the edge\n", through_b

        # Replica b knows the join it did not see: a second join of edge-1 with a valid token is refused there.
        with attacker_tunnel(b, cert=False) as tls:
            tls.sendall(frame(13, 0, json.dumps({"token": token, "nodeName": "edge-1", "nodeIPs": [],
                                                 "csrPEM": csr_for(tmp_path, "edge-1")}).encode()))
            reason = refusal(tls)
        assert reason and "edge-1" in reason and "already joined" in reason, reason
    finally:
        c.close()
