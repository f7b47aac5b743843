"""The join state shared by replicas in ConfigMaps (`--join-state-namespace`), against a stand-in for the Kubernetes
API server (kube_standin.py: there is no kube-apiserver on these machines): joins through any replica, a join
undone when its certificate never reached the node, no join before the state is listed, and a revoked node that
stays refused whatever happens to its record. Leases, Services, Nodes and RBAC are in test_kube_api.py, lists and
watches in test_kube_api_watches.py.

RBAC is the manifests': every test's stand-in authorizes the server's requests (its ServiceAccount's token) with the
Roles, ClusterRoles and bindings that `edgetunnel manifests` renders, and a test whose server (or `edgetunnel token|
node`, which run in the server's pod) was refused by them fails, unless it expects refusals. The tests' own requests
(`Lab.api`, as kubectl) carry a cluster admin's token.
"""
import concurrent.futures
import json
import pathlib
import socket
import ssl
import sys
import time

from conftest import BIN, run
from support.harness import PYTHON_HELPER_EXITS, free_port, holds_for, http_get, read_frame, wait_until
from support.kube import edge_1_agent, join_frame, lab  # noqa: F401  (lab is a fixture)

HERE = pathlib.Path(__file__).resolve().parent


def join_answer(lab, server, payload):
    """Sends a JOIN to `server`'s tunnel port without a client certificate: (frame type, reason or None)."""
    context = ssl.create_default_context(cafile=str(lab.pki / "ca.crt"))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", server.ports["tunnel"]), timeout=20) as raw:
        with context.wrap_socket(raw) as tls:
            tls.sendall(payload)
            frame_type, _, body = read_frame(tls)
    return frame_type, (json.loads(body).get("reason") if frame_type == 15 else None)


def test_the_join_state_in_configmaps_is_shared_by_every_replica(lab):
    """Tokens and node records as ConfigMaps (--join-state-namespace), two replicas with no shared folder for them:
    a token made with the CLI holds only its hash; a node that joined through r1 is known to r2 (it connects there,
    and a second join of its name there is refused); two joins of one new name at once through r1 and r2 give one
    certificate (the API server's conflict decides), and so do two names naming one IP; the CLI's revoke closes the
    node's tunnels on both replicas, and its reset lets the node join again."""
    namespace = ["--join-state-namespace", "edge-tunnel"]
    cli = ["--kubeconfig", lab.kubeconfig, *namespace]
    servers = [lab.start_server(i, *namespace, "--state-dir", lab.tmp / f"state-{i}") for i in (1, 2)]
    for server in servers:
        wait_until(lambda: http_get(server.meta + "/readyz")[0] == 200, 20, "replica ready")
    token = run(BIN / "edgetunnel", "token", "create", "--node-cidr", "127.0.0.0/8", *cli).stdout.strip()
    objects = lab.api("GET", "/api/v1/namespaces/edge-tunnel/configmaps?labelSelector=edgetunnel.io%2Fjoin-state%3Dtoken", None)
    assert [o["metadata"]["name"] for o in objects["items"]] == [f"edge-tunnel-token-{token.split('.')[0]}"]
    assert token.split(".")[1] not in json.dumps(objects) and "sha256:" in json.dumps(objects)
    assert not (lab.pki / "tokens.json").exists()

    # edge-1 joins through r1; r2 sees the join (it lets edge-1 in, and refuses a second join of the name).
    edge = lab.spawn([sys.executable, HERE / "edge_service.py", "127.0.0.1", edge_port := free_port()], "edge",
                     clean_exits=PYTHON_HELPER_EXITS)
    agent_dir = lab.tmp / "agent-edge-1"

    def agent(server, name, join):
        meta = free_port()
        args = [BIN / "edge-tunnel-agent", "--node-name", "edge-1", "--server-address",
                f"127.0.0.1:{server.ports['tunnel']}", "--pki-dir", agent_dir, "--meta-port", meta,
                "--node-ip", "127.0.0.1", "--allow", f"127.0.0.1:{edge_port}"]
        if join:
            ca_hash = run(BIN / "edgetunnel", "pki", "ca-hash", "--pki-dir", lab.pki).stdout.strip()
            args += ["--bootstrap-token", token, "--ca-cert-hash", ca_hash]
        proc = lab.spawn(args, name)
        wait_until(lambda: http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200, 20, f"{name} ready")
        return proc

    agent(servers[0], "agent-on-r1", join=True)
    agent(servers[1], "agent-on-r2", join=False)
    frame_type, reason = join_answer(lab, servers[1], join_frame(lab, token, "edge-1"))
    assert frame_type == 15 and "edge-1 has already joined" in reason, reason
    listed = json.loads(run(BIN / "edgetunnel", "node", "list", "--output", "json", *cli).stdout)
    assert [(n["name"], n["ips"]) for n in listed if n.get("joined")] == [("edge-1", ["127.0.0.1"])]

    # Two joins of one new name at the same moment, one through each replica: one certificate, one refusal.
    payloads = [join_frame(lab, token, "edge-9", ip="127.0.0.9") for _ in servers]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda pair: join_answer(lab, *pair), zip(servers, payloads)))
    assert sorted(t for t, _ in answers) == [14, 15], answers
    assert "edge-9 has already joined" in next(r for t, r in answers if t == 15), answers
    listed = json.loads(run(BIN / "edgetunnel", "node", "list", "--output", "json", *cli).stdout)
    assert [n["name"] for n in listed if n.get("joined")] == ["edge-1", "edge-9"], listed

    # Two new names naming one IP at the same moment, one through each replica: the IP's claim object lets one
    # have it (neither replica had seen the other's join).
    payloads = [join_frame(lab, token, name, ip="127.0.0.7") for name in ("edge-7", "edge-8")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda pair: join_answer(lab, *pair), zip(servers, payloads)))
    assert sorted(t for t, _ in answers) == [14, 15], answers
    assert "node IP 127.0.0.7" in next(r for t, r in answers if t == 15), answers
    listed = json.loads(run(BIN / "edgetunnel", "node", "list", "--output", "json", *cli).stdout)
    holders = [n["name"] for n in listed if n.get("joined") and "127.0.0.7" in n["ips"]]
    assert len(holders) == 1, listed

    # Revoked with the CLI: both replicas close edge-1's tunnel and keep refusing its agents' reconnects.
    run(BIN / "edgetunnel", "node", "revoke", "edge-1", *cli)
    for server in servers:
        wait_until(lambda: "edge-1" not in http_get(server.meta + "/v1/agents")[1], 15, "edge-1 cut off")
    # Still refused: for 3 s, while its agents redial, edge-1 is on neither replica at any moment (checked throughout).
    holds_for(lambda: all("edge-1" not in http_get(server.meta + "/v1/agents")[1] for server in servers), 3,
              "edge-1 kept off both replicas after its revocation")

    # A hand-edited record that no longer parses fails closed: the revocation stands, and a join of the name
    # is refused with the object to fix. Put back, the reset lets the node join again, through either replica.
    path = "/api/v1/namespaces/edge-tunnel/configmaps?labelSelector=edgetunnel.io%2Fjoin-state%3Dnode"
    saved = next(o for o in lab.api("GET", path, None)["items"] if '"edge-1"' in o["data"]["record"])
    item = f"/api/v1/namespaces/edge-tunnel/configmaps/{saved['metadata']['name']}"
    broken = lab.api("PUT", item, {**saved, "data": {"record": "{not json"}})
    time.sleep(3)
    assert all("edge-1" not in http_get(server.meta + "/v1/agents")[1] for server in servers)
    frame_type, reason = join_answer(lab, servers[1], join_frame(lab, token, "edge-1"))
    assert frame_type == 15 and "does not hold a valid record of node edge-1" in reason, reason
    lab.api("PUT", item, {**saved, "metadata": {**saved["metadata"], "resourceVersion": broken["metadata"]["resourceVersion"]}})
    run(BIN / "edgetunnel", "node", "reset", "edge-1", *cli)
    frame_type, reason = join_answer(lab, servers[1], join_frame(lab, token, "edge-1"))
    assert frame_type == 14, reason

    # A reset or a revocation frees the node's IPs at once: another node may name them now, not only once the
    # claim's one-minute grace has passed (edge-1's claim of 127.0.0.1 was renewed by the join just above).
    run(BIN / "edgetunnel", "node", "reset", "edge-1", *cli)
    frame_type, reason = join_answer(lab, servers[0], join_frame(lab, token, "edge-2"))
    assert frame_type == 14, reason
    run(BIN / "edgetunnel", "node", "revoke", "edge-2", *cli)
    frame_type, reason = join_answer(lab, servers[1], join_frame(lab, token, "edge-4"))
    assert frame_type == 14, reason
    claims = lab.api("GET", "/api/v1/namespaces/edge-tunnel/configmaps?labelSelector=edgetunnel.io%2Fjoin-state%3Dip", None)
    holders = [json.loads(o["data"]["claim"])["node"] for o in claims["items"] if '"127.0.0.1"' in o["data"]["claim"]]
    assert holders == ["edge-4"], holders
    edge.stop()


def test_a_join_whose_certificate_never_reached_the_node_is_undone(lab):
    """The API server stored the node's record but answered slowly, and the joining node hung up meanwhile: the
    certificate was never delivered, so the replica undoes the record. The name is not locked out until an
    operator resets it: the node's next join succeeds."""
    cli = ["--kubeconfig", lab.kubeconfig, "--join-state-namespace", "edge-tunnel"]
    server = lab.start_server(1, "--join-state-namespace", "edge-tunnel")
    wait_until(lambda: http_get(server.meta + "/readyz")[0] == 200, 20, "replica ready")
    token = run(BIN / "edgetunnel", "token", "create", "--node-cidr", "127.0.0.0/8", *cli).stdout.strip()
    (lab.kube / "slow-writes").write_text("2")
    context = ssl.create_default_context(cafile=str(lab.pki / "ca.crt"))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", server.ports["tunnel"]), timeout=20) as raw:
        with context.wrap_socket(raw) as tls:
            tls.sendall(join_frame(lab, token, "edge-3"))
            time.sleep(0.5)  # the record is being written (its answer takes 2 s): hang up now
    server.expect_log("join of edge-3 recorded but its certificate was not delivered: undoing it", timeout=15)
    (lab.kube / "slow-writes").unlink()
    assert any(line.startswith("POST ") and "configmaps" in line for line in lab.requests())

    def joined():
        listed = json.loads(run(BIN / "edgetunnel", "node", "list", "--output", "json", *cli).stdout)
        return [n["name"] for n in listed if n.get("joined")]
    wait_until(lambda: joined() == [], 15, "the join undone")
    frame_type, reason = join_answer(lab, server, join_frame(lab, token, "edge-3"))
    assert frame_type == 14, reason
    assert joined() == ["edge-3"]


def test_before_the_join_state_is_listed_no_join_is_accepted(lab):
    """While the API refuses (RBAC), a replica with --join-state-namespace cannot know the tokens or a revocation:
    a join is refused with that reason, not as a bad token; once the API answers, the same join succeeds."""
    cli = ["--kubeconfig", lab.kubeconfig, "--join-state-namespace", "edge-tunnel"]
    token = run(BIN / "edgetunnel", "token", "create", "--node-cidr", "127.0.0.0/8", *cli).stdout.strip()
    (lab.kube / "deny").touch()
    server = lab.start_server(1, "--join-state-namespace", "edge-tunnel")
    frame_type, reason = join_answer(lab, server, join_frame(lab, token, "edge-1"))
    assert frame_type == 15 and "not loaded its tokens and node records yet" in reason, reason
    # Not ready on either path: a rollout whose RBAC is broken stops at its first pod.
    assert [http_get(server.meta + path)[0] for path in ("/readyz", "/readyz/listeners")] == [503, 503]
    (lab.kube / "deny").unlink()
    wait_until(lambda: join_answer(lab, server, join_frame(lab, token, "edge-1"))[0] == 14, 40, "the join accepted")
    assert http_get(server.meta + "/readyz/listeners")[0] == 200


JOIN_STATE = ["--join-state-namespace", "edge-tunnel"]
NODE_RECORDS = "/api/v1/namespaces/edge-tunnel/configmaps?labelSelector=edgetunnel.io%2Fjoin-state%3Dnode"


def join_state_replica(lab, index):
    """A replica with --join-state-namespace, ready (it has listed the tokens and the node records)."""
    server = lab.start_server(index, *JOIN_STATE, "--state-dir", lab.tmp / f"state-{index}")
    wait_until(lambda: http_get(server.meta + "/readyz")[0] == 200, 20, f"replica r{index} ready")
    return server


def revoked_edge_1(lab, server):
    """edge-1 joins through `server` and is revoked with the CLI; its agent is stopped. Returns the agent's folder
    (with the node's certificate) and the record's ConfigMap as it is now."""
    cli = ["--kubeconfig", lab.kubeconfig, *JOIN_STATE]
    token = run(BIN / "edgetunnel", "token", "create", "--node-cidr", "127.0.0.0/8", *cli).stdout.strip()
    agent_dir = lab.tmp / "agent-edge-1"
    agent, connected = edge_1_agent(lab, server, "agent-edge-1", agent_dir, token=token)
    wait_until(connected, 20, "edge-1 joined and connected")
    run(BIN / "edgetunnel", "node", "revoke", "edge-1", *cli)
    wait_until(lambda: "edge-1" not in http_get(server.meta + "/v1/agents")[1], 15, "edge-1 cut off")
    agent.stop()
    record = next(o for o in lab.api("GET", NODE_RECORDS, None)["items"] if '"edge-1"' in o["data"]["record"])
    return agent_dir, record


def assert_edge_1_stays_refused(lab, servers, agent_dir):
    """An agent of edge-1 with its certificate, on each of `servers`: each replica refuses it, again and again."""
    words = "tunnel connection refused: node edge-1"
    before = [server.text().count(words) for server in servers]
    agents = [edge_1_agent(lab, server, f"agent-edge-1-again-{i}", agent_dir) for i, server in enumerate(servers)]
    for server, count in zip(servers, before):
        wait_until(lambda: server.text().count(words) > count, 20, f"edge-1 refused ({pathlib.Path(server.log).name})")
    time.sleep(2)
    assert not any(connected() for _, connected in agents)
    assert all("edge-1" not in http_get(server.meta + "/v1/agents")[1] for server in servers)


def test_a_revoked_node_whose_record_is_deleted_stays_refused(lab):
    """Revocation fails closed: a GitOps prune or a restore from an older backup that deletes the record ConfigMap
    of a revoked node does not let the node back in, neither on the replica that saw the revocation nor on one
    started after the deletion, which never saw a record of it (no record, no tunnel)."""
    first = join_state_replica(lab, 1)
    agent_dir, record = revoked_edge_1(lab, first)
    lab.api("DELETE", f"/api/v1/namespaces/edge-tunnel/configmaps/{record['metadata']['name']}", {})
    assert not [o for o in lab.api("GET", NODE_RECORDS, None)["items"] if '"edge-1"' in o["data"]["record"]]
    second = join_state_replica(lab, 2)
    assert_edge_1_stays_refused(lab, [first, second], agent_dir)


def test_a_revoked_node_whose_record_no_longer_parses_stays_refused(lab):
    """A record ConfigMap edited so that it no longer parses counts as revoked: a replica started after the edit,
    which never saw the record parse, refuses the node as the replica that saw the revocation does, and each says
    once which ConfigMap to fix."""
    first = join_state_replica(lab, 1)
    agent_dir, record = revoked_edge_1(lab, first)
    name = record["metadata"]["name"]
    lab.api("PUT", f"/api/v1/namespaces/edge-tunnel/configmaps/{name}", {**record, "data": {"record": "{not json"}})
    second = join_state_replica(lab, 2)
    assert_edge_1_stays_refused(lab, [first, second], agent_dir)
    line = f"ConfigMap edge-tunnel/{name} does not hold a valid node record: its node counts as revoked"
    assert [server.text().count(line) for server in (first, second)] == [1, 1]


def test_a_revoked_node_whose_record_loses_its_label_stays_refused(lab):
    """A record ConfigMap whose label is removed (a hand edit, a GitOps tool that owns the labels) stops matching
    the replicas' label-selector watch: the API server sends DELETED, as for a deleted object. The revocation
    stands on the replica that saw it, and on one started after the edit, which never lists the record."""
    first = join_state_replica(lab, 1)
    agent_dir, record = revoked_edge_1(lab, first)
    name = record["metadata"]["name"]
    lab.api("PUT", f"/api/v1/namespaces/edge-tunnel/configmaps/{name}",
            {**record, "metadata": {**record["metadata"], "labels": {}}})
    wait_until(lambda: any(e[:3] == ("DELETED", "configmaps", name) for e in lab.events()), 10, "DELETED sent")
    assert not [o for o in lab.api("GET", NODE_RECORDS, None)["items"] if '"edge-1"' in o["data"]["record"]]
    second = join_state_replica(lab, 2)
    assert_edge_1_stays_refused(lab, [first, second], agent_dir)
