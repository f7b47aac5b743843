"""Replicas counted by coordination.k8s.io Leases, against a stand-in for the Kubernetes API server
(kube_standin.py: there is no kube-apiserver on these machines; it serves the Lease endpoints the client uses,
with the API reference's JSON shapes, 410 Gone for compacted versions, 401 for a stale token and 403 from RBAC).

RBAC is the manifests': every test's stand-in authorizes the server's requests (its ServiceAccount's token) with the
Roles, ClusterRoles and bindings that `edgetunnel manifests` renders, and a test whose server (or `edgetunnel token|
node`, which run in the server's pod) was refused by them fails, unless it expects refusals. The tests' own requests
(`Lab.api`, as kubectl) carry a cluster admin's token.
"""
import concurrent.futures
import copy
import datetime
import json
import pathlib
import signal
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from conftest import BIN, run
from support.harness import PYTHON_HELPER_EXITS, free_port, holds_for, http_get, read_frame, wait_until
from support.kube import join_frame, lab, manifests  # noqa: F401  (lab is a fixture)

HERE = pathlib.Path(__file__).resolve().parent


def server_yaml():
    """The server's configuration as the manifests' ConfigMap gives it."""
    config = next(d for d in manifests() if d["kind"] == "ConfigMap" and "server.yaml" in d.get("data", {}))
    return yaml.safe_load(config["data"]["server.yaml"])


def test_the_replica_count_follows_the_leases(lab):
    """Three replicas each hold a Lease: each counts 3. One stopped deletes its Lease: 2 at once. One killed
    stops renewing: 1 once its Lease expires (15 s). No flag changes. The stand-in gives one item a page, as an
    API server may: the Leases are read page by page, and a continue token that expired starts the list again."""
    (lab.kube / "max-page").write_text("1")
    for index in range(3):
        if index == 2:  # two Leases exist: the third replica's list has a second page, whose token expired
            wait_until(lambda: lab.replicas(0) == 2 and lab.replicas(1) == 2, 20, "two Leases written")
            (lab.kube / "expire-continue").write_text("")
        lab.start_server(index)
    wait_until(lambda: all(lab.replicas(i) == 3 for i in range(3)), 20, "every replica counting 3")
    lists = [line for line in lab.requests() if line.startswith("GET ") and "leases?" in line]
    assert any("continue=" in line and line.endswith(" 200") for line in lists), lists
    assert any("continue=" in line and line.endswith(" 410") for line in lists), lists
    lab.servers[2].stop()
    started = time.monotonic()
    wait_until(lambda: lab.replicas(0) == 2 and lab.replicas(1) == 2, 10, "a stopped replica's Lease gone")
    assert time.monotonic() - started < 5
    lab.servers[1].send_signal(signal.SIGKILL)
    wait_until(lambda: lab.replicas(0) == 1, 25, "a killed replica's Lease expired")
    assert any(line.startswith("DELETE ") and "edge-tunnel-server-r2" in line for line in lab.requests())


def test_a_config_reload_does_not_override_the_lease_count(lab):
    """With Leases, the config file's serverCount only stands in until the first list: a reload (SIGHUP, or an
    edited ConfigMap) keeps the count the Leases say."""
    config = lab.tmp / "server.yaml"
    config.write_text("serverCount: 5\n")
    server = lab.start_server(0, "--lease-namespace", "kube-system", "--config", config)
    wait_until(lambda: lab.replicas(0) == 1, 20, "the count from the one Lease")
    config.write_text("serverCount: 5\ncertDNSNames: [reloaded.example]\n")
    server.send_signal(signal.SIGHUP)
    server.expect_log("configuration applied", timeout=10)
    time.sleep(1)
    assert lab.replicas(0) == 1


def test_readiness_waits_for_the_address_services(lab):
    """Until the addresses of every --address-service are listed, the certificate may lack the one a caller
    dials: the replica is not ready (both paths) and says which Service it waits for."""
    (lab.kube / "deny").touch()
    server = lab.start_server(0, "--address-service", "kube-system/x-tunnel-server-internal-svc")
    for path in ("/readyz", "/readyz/listeners"):
        status, body = http_get(server.meta + path)
        assert status == 503 and "Service kube-system/x-tunnel-server-internal-svc" in body, (status, body)
    (lab.kube / "deny").unlink()
    wait_until(lambda: http_get(server.meta + "/readyz")[0] == 200, 40, "ready once the Service is listed")


def test_a_rotated_token_a_compacted_watch_and_rbac_refusals_are_handled(lab):
    """The token file is re-read for each request (projected tokens rotate): once the kubelet wrote a new token, the
    requests carry it, and the old one, still valid until it expires as a projected token is, is not refused in the
    meantime (a request built just before the rewrite is checked just after it). A 401 all the same (a token that
    expired just as it was checked) is asked again once, with the file read anew. A watch whose version was compacted
    gets 410 and the client lists again; a 403 is logged with the API's own message."""
    server = lab.start_server(0)
    wait_until(lambda: any(line.startswith("WATCH ") for line in lab.requests()), 15, "a watch")
    (lab.kube / "token").write_text("token-two\n")
    rotated = time.time()
    wait_until(lambda: any(at > rotated and method == "PUT" and code == 200 and auth == "current"
                           for at, method, _, code, _, auth in lab.timeline()), 15, "a renewal with the rotated token")
    assert not [row for row in lab.timeline() if row[3] == 401], lab.timeline()
    # The next request is refused (401) whatever its token: the client reads the file again and asks once more.
    (lab.kube / "reject-once").write_text("1")
    wait_until(lambda: not (lab.kube / "reject-once").exists(), 15, "a request refused with 401")
    refused = next(row for row in lab.timeline() if row[3] == 401)
    wait_until(lambda: any(row[0] >= refused[0] and row[1:3] == refused[1:3] and row[3] in (200, 201)
                           for row in lab.timeline()), 5, "the refused request asked again")
    again = next(row for row in lab.timeline() if row[0] >= refused[0] and row[1:3] == refused[1:3] and row[3] in (200, 201))
    assert again[0] - refused[0] < 0.5, (refused, again)  # at once, not after a renewal interval or a backoff
    lists_before = sum(1 for line in lab.requests() if line.startswith("GET ") and "labelSelector" in line)
    (lab.kube / "compact").write_text("")
    wait_until(lambda: sum(1 for line in lab.requests() if line.startswith("GET ") and "labelSelector" in line)
               > lists_before, 20, "a list again after 410 Gone")
    (lab.kube / "deny").write_text("")
    server.expect_log('HTTP 403: leases.coordination.k8s.io "edge-tunnel-server-r0" is forbidden: User '
                      '"system:serviceaccount:kube-system:edge-tunnel-server" cannot get resource "leases" in API group '
                      '"coordination.k8s.io" in the namespace "kube-system"', timeout=15)
    (lab.kube / "deny").unlink()
    assert server.alive()


@pytest.mark.parametrize("code,retry_after,storm", [(429, 2, 20), (503, 2, 8), (500, 2, 8), (500, None, 8)],
                         ids=["429", "503", "500-ServerTimeout", "500-no-Retry-After"])
def test_a_refusal_storm_slows_the_client_to_the_retry_after_and_it_is_back_at_once(lab, code, retry_after, storm):
    """Every request refused with `code` for `storm` seconds (429 as API Priority and Fairness answers, 503, 500), with
    Retry-After: 2 or none. With a Retry-After the client asks nothing of the API server until it has passed: it
    slows to at most one request per Retry-After per follower (here the Lease renewal and the Lease watch: at most
    1 request a second), and no request arrives sooner than the Retry-After after a refusal (those already on the way
    aside). Once the storm ends it is back within the last Retry-After and 2 s, the renewal and the Leases' list
    both, not after its own backoff (1 s doubling, which after a 20-s storm waited 8 to 16 s). Without a Retry-After
    (a plain 500) it backs off on its own: no hot loop, and back within its backoff's reach."""
    server = lab.start_server(0)
    wait_until(lambda: lab.replicas(0) == 1 and any(line.startswith("WATCH ") for line in lab.requests()), 20,
               "the replica following its Lease")
    (lab.kube / "fail").write_text(f"{code} {retry_after or ''}")
    (lab.kube / "compact").write_text("")  # the open watch ends (410): the list and the watch are refused too
    began = time.time()
    time.sleep(storm)
    (lab.kube / "fail").unlink()
    ended = time.time()
    wait_until(lambda: any(at > ended and method == "PUT" and c == 200 for at, method, _, c, _, _ in lab.timeline()),
               20, "a renewal after the storm")
    wait_until(lambda: any(at > ended and method == "GET" and "leases?" in url and c == 200
                           for at, method, url, c, _, _ in lab.timeline()), 40, "the Leases listed after the storm")
    rows = lab.timeline()
    refused = [row for row in rows if row[3] == code and began <= row[0] <= ended + 0.5]
    assert len(refused) >= 2, rows
    back = [min(at for at, method, url, c, _, _ in rows if at > ended and method == "PUT" and c == 200),
            min(at for at, method, url, c, _, _ in rows if at > ended and method == "GET" and "leases?" in url and c == 200)]
    if retry_after is None:
        assert len(refused) <= 2 * storm, refused  # backoff: no hot loop (one replica asks every 5 s and backs off)
        assert max(back) - ended < 20, (back, ended)
        return
    # Nothing arrives sooner than Retry-After after a refusal, except what was already on its way (0.3 s).
    for at, *_ in refused:
        early = [row for row in rows if at + 0.3 < row[0] < at + retry_after - 0.05]
        assert not early, (at, early)
    assert len(refused) <= 2 * (storm / retry_after + 1), refused  # at most one per Retry-After per follower
    last = max(at for at, *_ in refused)
    # The Leases' list is back within 2 s of the last Retry-After; the renewal within its own 5-s interval of it
    # (a renewal refused near the storm's end may wait for its next turn; twice in clean-clone runs it came 5.1 s
    # after): a few seconds, never the backoff's 30-s ceiling.
    renewal, listed = back
    assert listed - max(last + retry_after, ended) < 2, (back, last, ended)
    assert renewal - max(last + retry_after, ended) < 5 + 2, (back, last, ended)
    assert server.alive() and lab.replicas(0) == 1


def test_bookmarks_move_the_watch_version_and_leave_the_certificate_as_it_is(lab):
    """BOOKMARK events (asked for with allowWatchBookmarks, here every second) carry only a resourceVersion, and a
    Service bookmark is a Service with nothing else set: the client takes only the version from them. The serving
    certificate keeps the Service's addresses through every bookmark, and the next watch (the API server ends each
    after 4 s here) starts from the last bookmark's version, newer than anything the Service itself was at."""
    (lab.kube / "bookmark-seconds").write_text("1")
    (lab.kube / "watch-seconds").write_text("4")
    lab.api("POST", "/api/v1/namespaces/kube-system/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "x-tunnel-server-svc", "namespace": "kube-system"},
        "spec": {"type": "ClusterIP", "clusterIP": "127.0.0.6", "clusterIPs": ["127.0.0.6"]}})
    server = lab.start_server(0, "--lease-namespace", "kube-system", "--address-service", "kube-system/x-tunnel-server-svc",
                              bind="0.0.0.0")

    def certificate_ips():
        return set(json.loads(http_get(server.meta + "/v1/server")[1])["certificateIPs"])

    wait_until(lambda: "127.0.0.6" in certificate_ips(), 15, "the Service's address in the certificate")
    service_version = int(lab.api("GET", "/api/v1/namespaces/kube-system/services/x-tunnel-server-svc", None)
                          ["metadata"]["resourceVersion"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the Lease renewals move the version on; the Service's bookmarks follow
        assert "127.0.0.6" in certificate_ips()
        time.sleep(0.2)
    bookmarks = [int(rv) for kind, resource, _, rv in lab.events() if kind == "BOOKMARK" and resource == "services"]
    assert len(bookmarks) >= 5 and max(bookmarks) > service_version, bookmarks
    watched = [int(line.split("resourceVersion=")[1].split("&")[0].split(" ")[0]) for line in lab.requests()
               if line.startswith("WATCH ") and "/services?" in line]
    assert any(version in bookmarks and version > service_version for version in watched), (watched, bookmarks)
    assert "127.0.0.6" in certificate_ips() and server.alive()


def test_no_lease_write_is_rejected_by_validation(lab):
    """The stand-in validates as the API server does (a renewTime with three fractional digits does not decode:
    400; a leaseDurationSeconds of 0 is invalid: 422). Three replicas create and renew their Leases, and delete one
    on stopping: not one write is refused."""
    leases = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"
    for spec, expected in (({"renewTime": "2026-01-01T00:00:00.123Z"}, 400),
                           ({"renewTime": "2026-01-01T00:00:00.123456Z", "leaseDurationSeconds": 0}, 422)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            lab.api("POST", leases, {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                     "metadata": {"name": "probe"}, "spec": spec})
        assert refused.value.code == expected
        assert json.loads(refused.value.read())["kind"] == "Status"
    # The stand-in writes a request's timeline row after its answer: wait for the probes' rows, so that they are
    # older than `started` (once a probe's row came after it and counted as a replica's refused write).
    wait_until(lambda: sum(1 for _, method, url, c, _, _ in lab.timeline() if method == "POST" and c in (400, 422)) >= 2,
               5, "the probes' rows in the timeline")
    started = time.time()
    for index in range(3):
        lab.start_server(index)
    wait_until(lambda: all(lab.replicas(i) == 3 for i in range(3)), 20, "every replica counting 3")
    wait_until(lambda: sum(1 for _, method, url, c, _, _ in lab.timeline() if method == "PUT" and "/leases/" in url
                           and c == 200) >= 6, 20, "renewals")
    lab.servers[2].stop()
    writes = [row for row in lab.timeline() if row[0] >= started and row[1] in ("POST", "PUT", "PATCH", "DELETE")
              and "/leases" in row[2]]
    assert not [row for row in writes if row[3] in (400, 422)], writes
    assert sum(1 for row in writes if row[1] == "POST" and row[3] == 201) == 3, writes
    assert any(row[1] == "DELETE" and row[3] == 200 for row in writes), writes


def test_the_certificate_follows_the_service_from_loadbalancer_to_clusterip(lab):
    """The source document's private-line step, as one patch of the Service: its addresses go into the serving
    certificate live (same process), and an agent dialing the new ClusterIP connects."""
    lab.api("POST", "/api/v1/namespaces/kube-system/services", {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "x-tunnel-server-svc", "namespace": "kube-system", "labels": {"name": "edge-tunnel-server"}},
        "spec": {"type": "LoadBalancer", "clusterIP": "127.0.0.6", "clusterIPs": ["127.0.0.6"]},
        "status": {"loadBalancer": {"ingress": [{"ip": "127.0.0.5"}]}}})
    # The callers' Service (only replicas that hold every node): its address is named too.
    lab.api("POST", "/api/v1/namespaces/kube-system/services", {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "x-tunnel-server-internal-svc", "namespace": "kube-system"},
        "spec": {"type": "ClusterIP", "clusterIP": "127.0.0.8", "clusterIPs": ["127.0.0.8"]}})
    server = lab.start_server(0, "--address-service", "kube-system/x-tunnel-server-svc,kube-system/x-tunnel-server-internal-svc",
                              bind="0.0.0.0")

    def certificate_ips():
        return set(json.loads(http_get(server.meta + "/v1/server")[1])["certificateIPs"])

    wait_until(lambda: {"127.0.0.5", "127.0.0.6", "127.0.0.8"} <= certificate_ips(), 15,
               "the addresses of both Services in the certificate")
    token = run(BIN / "edgetunnel", "token", "create", "--pki-dir", lab.pki).stdout.strip()
    ca_hash = run(BIN / "edgetunnel", "pki", "ca-hash", "--pki-dir", lab.pki).stdout.strip()

    def agent(name, address):
        meta = free_port()
        proc = lab.spawn([BIN / "edge-tunnel-agent", "--node-name", name, "--server-address", f"{address}:{server.ports['tunnel']}",
                          "--pki-dir", lab.tmp / f"agent-{name}", "--meta-port", meta, "--bootstrap-token", token,
                          "--ca-cert-hash", ca_hash], f"agent-{name}")
        wait_until(lambda: http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200, 20, f"agent {name} via {address}")
        return proc

    agent("edge-1", "127.0.0.5")
    pid = server.popen.pid
    lab.api("PATCH", "/api/v1/namespaces/kube-system/services/x-tunnel-server-svc", {
        "spec": {"type": "ClusterIP", "clusterIP": "127.0.0.7", "clusterIPs": ["127.0.0.7"]},
        "status": {"loadBalancer": {"ingress": None}}})
    wait_until(lambda: "127.0.0.7" in certificate_ips() and "127.0.0.5" not in certificate_ips(), 15,
               "the certificate to follow the patched Service")
    assert "127.0.0.8" in certificate_ips()  # the other Service's address stays
    agent("edge-2", "127.0.0.7")
    agent("edge-3", "127.0.0.8")
    assert server.popen.pid == pid and server.alive()


def node(name, *addresses):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]}}


def test_agents_register_only_as_existing_nodes_with_their_nodes_addresses(lab):
    """--node-objects: edge-1's Node reports 127.0.0.11 and it registers with it; edge-2 has no Node until one is
    created, then registers; edge-3's Node reports another address than the one its agent claims: refused.
    Deleting edge-1's Node closes its tunnel."""
    lab.api("POST", "/api/v1/nodes", node("edge-1", "127.0.0.11"))
    lab.api("POST", "/api/v1/nodes", node("edge-3", "10.0.0.3"))
    server = lab.start_server(0, "--node-objects")
    token = run(BIN / "edgetunnel", "token", "create", "--pki-dir", lab.pki, "--node-cidr", "127.0.0.0/8").stdout.strip()
    ca_hash = run(BIN / "edgetunnel", "pki", "ca-hash", "--pki-dir", lab.pki).stdout.strip()
    metas = {}

    def agent(name):
        metas[name] = free_port()
        return lab.spawn([BIN / "edge-tunnel-agent", "--node-name", name, "--node-ip", f"127.0.0.1{name[-1]}",
                          "--server-address", f"127.0.0.1:{server.ports['tunnel']}", "--pki-dir", lab.tmp / f"agent-{name}",
                          "--meta-port", metas[name], "--bootstrap-token", token, "--ca-cert-hash", ca_hash], f"agent-{name}")

    def up(name):
        return http_get(f"http://127.0.0.1:{metas[name]}/readyz")[0] == 200

    for name in ("edge-1", "edge-2", "edge-3"):
        agent(name)
    wait_until(lambda: up("edge-1"), 20, "edge-1 registered")
    server.expect_log("there is no Node object named edge-2 in the cluster", timeout=10)
    server.expect_log("node IP 127.0.0.13 is not among the addresses of Node edge-3 (10.0.0.3)", timeout=10)
    assert not up("edge-2") and not up("edge-3")
    lab.api("POST", "/api/v1/nodes", node("edge-2", "127.0.0.12"))
    # Refused until now, the agent backs off with full jitter up to 30 s: a sleep begun just before the Node
    # appeared may last that long, then the handshake and the Node's watch event.
    wait_until(lambda: up("edge-2"), 60, "edge-2 registered once its Node exists")
    lab.api("DELETE", "/api/v1/nodes/edge-1", {})
    wait_until(lambda: not up("edge-1"), 10, "edge-1's tunnel closed with its Node")
    server.expect_log("the Node object of edge-1 was deleted")


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


def test_a_watch_error_event_backs_off_instead_of_watching_again_at_once(lab):
    """An ERROR event other than 410 (here 500, as when etcd times out) ends a watch. The client then waits 1 s,
    2 s, 4 s … (each jittered down to half, at most 30 s) before it lists and watches again, instead of a hot loop
    against the API server. Once the API server answers again, the Leases are followed as before."""
    server = lab.start_server(0)
    wait_until(lambda: lab.replicas(0) == 1, 20, "the count from the one Lease")
    (lab.kube / "watch-error").write_text("500")
    # Every version so far compacted away: the open watch ends (410), and the one after the list gets the error.
    (lab.kube / "compact").write_text("")
    lab.api("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases", None)
    server.expect_log("ended with an ERROR event 500 InternalError: etcdserver: request timed out", timeout=20)
    first = len(lab.requests())
    time.sleep(6)
    watches = sum(1 for line in lab.requests()[first:] if line.startswith("WATCH "))
    # Waits of 0.5-1 s, 1-2 s, 2-4 s, 4-8 s: three more watches at most within 6 s (a hot loop makes hundreds).
    assert 2 <= watches <= 4, watches
    (lab.kube / "watch-error").unlink()
    lab.start_server(1)
    wait_until(lambda: lab.replicas(0) == 2, 40, "the second replica's Lease seen once the watch works again")
    assert server.alive()


JOIN_STATE = ["--join-state-namespace", "edge-tunnel"]
NODE_RECORDS = "/api/v1/namespaces/edge-tunnel/configmaps?labelSelector=edgetunnel.io%2Fjoin-state%3Dnode"


def join_state_replica(lab, index):
    """A replica with --join-state-namespace, ready (it has listed the tokens and the node records)."""
    server = lab.start_server(index, *JOIN_STATE, "--state-dir", lab.tmp / f"state-{index}")
    wait_until(lambda: http_get(server.meta + "/readyz")[0] == 200, 20, f"replica r{index} ready")
    return server


def edge_1_agent(lab, server, name, agent_dir, token=None):
    """The agent of node edge-1 on `server`: it joins with `token`, or else uses the certificate in `agent_dir`.
    Returns the process and a check of whether it holds its tunnel."""
    meta = free_port()
    args = [BIN / "edge-tunnel-agent", "--node-name", "edge-1", "--server-address", f"127.0.0.1:{server.ports['tunnel']}",
            "--pki-dir", agent_dir, "--meta-port", meta, "--node-ip", "127.0.0.1"]
    if token:
        ca_hash = run(BIN / "edgetunnel", "pki", "ca-hash", "--pki-dir", lab.pki).stdout.strip()
        args += ["--bootstrap-token", token, "--ca-cert-hash", ca_hash]
    proc = lab.spawn(args, name)

    def connected():
        try:
            return http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200
        except OSError:  # its meta port not open yet
            return False
    return proc, connected


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


def test_lists_follow_an_empty_page_and_watches_start_as_the_api_server_starts_them(lab):
    """A first page with no item but a continue token (a label selector filters after a page is read) is followed,
    not taken as an empty list: the replica counts its own Lease. A watch from version 0 starts with the current
    objects as ADDED, also after a compaction (never 410); a watch from a version the API server has not reached
    gets an ERROR 504 Timeout "Too large resource version" with the cause ResourceVersionTooLarge."""
    (lab.kube / "empty-page").write_text("")
    lab.start_server(0)
    wait_until(lambda: lab.replicas(0) == 1 and any(line.startswith("WATCH ") for line in lab.requests()), 20,
               "the Lease listed past the empty page")
    assert any("continue=" in line and "leases?" in line and line.endswith(" 200") for line in lab.requests())
    (lab.kube / "compact").write_text("")
    context = ssl.create_default_context(cafile=str(lab.kube / "ca.crt"))
    token = (lab.kube / "token").read_text().strip()

    def watch(version):
        request = urllib.request.Request(
            f"{lab.api_url}/apis/coordination.k8s.io/v1/namespaces/kube-system/leases?watch=1&resourceVersion={version}"
            "&timeoutSeconds=1", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return [json.loads(line) for line in response.read().splitlines() if line.strip()]

    events = watch(0)
    assert [e["type"] for e in events] == ["ADDED"] and events[0]["object"]["metadata"]["name"] == "edge-tunnel-server-r0"
    events = watch(10**9)
    assert [e["type"] for e in events] == ["ERROR"], events
    error = events[0]["object"]
    assert (error["code"], error["reason"]) == (504, "Timeout") and "Too large resource version" in error["message"]
    assert error["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"


# RBAC: the manifests' Roles and ClusterRoles, enforced per verb, API group, resource and namespace.

def granted(rbac):
    """(group, resource, verb) of every rule of the Roles and ClusterRoles `rbac` holds."""
    return {(group, resource, verb) for role in rbac["objects"] if role["kind"] in ("Role", "ClusterRole")
            for rule in role.get("rules", []) for group in rule["apiGroups"] for resource in rule["resources"]
            for verb in rule["verbs"]}


def test_the_manifests_rbac_grants_every_request_of_a_server_with_every_kubernetes_feature(lab):
    """The server as the manifests configure it (their server.yaml: Leases, both address Services, Node objects and the
    join state in ConfigMaps), with the manifests' RBAC enforced by the stand-in. Its Lease is created, read, renewed,
    listed, watched and deleted as it stops; the Services and the Nodes are listed and watched; a token is made, a
    node joins and is revoked (the CLI runs in the server's pod, with its ServiceAccount). Not one request is refused,
    and every permission the manifests grant was used: a verb the client uses that the Roles lack, or a Role granting
    what the server never asks, fails the test. With no agent left, SIGTERM stops it within 1.5 s."""
    config = server_yaml()
    features = ("leaseNamespace", "addressService", "checkNodeObjects", "joinStateNamespace")
    assert all(config.get(key) for key in features), config  # every Kubernetes feature on, as deployed
    (lab.tmp / "server.yaml").write_text(yaml.safe_dump({key: config[key] for key in features}))
    for index, service in enumerate(config["addressService"].split(",")):
        namespace, name = service.split("/")
        lab.api("POST", f"/api/v1/namespaces/{namespace}/services", {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"type": "ClusterIP", "clusterIP": f"127.0.0.{6 + index}", "clusterIPs": [f"127.0.0.{6 + index}"]}})
    lab.api("POST", "/api/v1/nodes", node("edge-1", "127.0.0.1"))
    started = time.time()
    server = lab.start_server(0, "--config", lab.tmp / "server.yaml", "--state-dir", lab.tmp / "state-0",
                              bind="0.0.0.0")
    wait_until(lambda: http_get(server.meta + "/readyz")[0] == 200, 20, "the replica ready")
    cli = ["--kubeconfig", lab.kubeconfig, "--join-state-namespace", config["joinStateNamespace"]]
    token = run(BIN / "edgetunnel", "token", "create", "--node-cidr", "127.0.0.0/8", *cli).stdout.strip()
    agent, connected = edge_1_agent(lab, server, "agent-edge-1", lab.tmp / "agent-edge-1", token=token)
    wait_until(connected, 20, "edge-1 joined and connected")
    run(BIN / "edgetunnel", "node", "revoke", "edge-1", *cli)
    wait_until(lambda: "edge-1" not in http_get(server.meta + "/v1/agents")[1], 15, "edge-1 cut off")
    agent.stop()
    wait_until(lambda: any(at > started and method == "PUT" and "/leases/" in url and code == 200
                           for at, method, url, code, _, _ in lab.timeline()), 15, "a renewal of the Lease")
    # A rolling update waits for each pod to stop: with no agent left to drain, SIGTERM ends the process at once
    # (it took 5 s, swift-nio-ssl waiting for the API server's close_notify on connections already done with).
    stopping = time.monotonic()
    server.stop()
    assert time.monotonic() - stopping < 1.5, f"the server took {time.monotonic() - stopping:.1f} s to stop"
    decisions = lab.rbac_decisions()
    assert not [d for d in decisions if not d["allowed"]], decisions
    used = {(d["group"], d["resource"], d["verb"]) for d in decisions if d["allowed"]}
    assert used == granted(lab.rbac), (sorted(used), sorted(granted(lab.rbac)))
    assert {("coordination.k8s.io", "leases", verb) for verb in ("get", "list", "watch", "create", "update", "delete")} <= used
    assert any(line.startswith("DELETE ") and "/leases/edge-tunnel-server-r0" in line and line.endswith(" 200")
               for line in lab.requests())


@pytest.mark.parametrize("resource,verb", [("leases", "update"), ("services", "watch")])
def test_a_verb_the_manifests_do_not_grant_is_refused_and_the_server_says_which(lab, resource, verb):
    """The stand-in's RBAC is the manifests' and no more lenient: with one verb taken out of the server's Role, the
    request that needs it gets 403 with the API server's message, and the server's log names the permission it lacks
    (the Lease renewal's update; the address Service's watch, refused as a watch is, with a Status and no event).
    Nothing else is refused."""
    lab.refusals_expected = True
    rbac = copy.deepcopy(lab.rbac)
    role = next(o for o in rbac["objects"] if o["kind"] == "Role" and o["metadata"]["name"] == "edge-tunnel-server")
    rule = next(r for r in role["rules"] if resource in r["resources"])
    rule["verbs"].remove(verb)
    lab.write_rbac(rbac)
    if resource == "leases":
        server = lab.start_server(0)
        qualified, name, group = "leases.coordination.k8s.io", "edge-tunnel-server-r0", "coordination.k8s.io"
    else:
        server = lab.start_server(0, "--address-service", "kube-system/x-tunnel-server-svc")
        qualified, name, group = "services", "x-tunnel-server-svc", ""
    server.expect_log(f'HTTP 403: {qualified} "{name}" is forbidden: User "system:serviceaccount:kube-system:'
                      f'edge-tunnel-server" cannot {verb} resource "{resource}" in API group "{group}" in the namespace '
                      '"kube-system"', timeout=15)
    decisions = lab.rbac_decisions()
    refused = {(d["resource"], d["verb"], d["namespace"], d["name"]) for d in decisions if not d["allowed"]}
    assert refused == {(resource, verb, "kube-system", name)}, decisions
    assert any(d["allowed"] for d in decisions)
    assert server.alive()


# Watches cut mid-stream, and ended by their timeout.

SERVICE = "/api/v1/namespaces/kube-system/services"


def service_replica(lab):
    """x-tunnel-server-svc at 127.0.0.6, and a replica whose certificate follows it. Returns the replica and a
    function giving its certificate's IPs."""
    lab.api("POST", SERVICE, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "x-tunnel-server-svc", "namespace": "kube-system"},
        "spec": {"type": "ClusterIP", "clusterIP": "127.0.0.6", "clusterIPs": ["127.0.0.6"]}})
    server = lab.start_server(0, "--address-service", "kube-system/x-tunnel-server-svc", bind="0.0.0.0")

    def certificate_ips():
        return set(json.loads(http_get(server.meta + "/v1/server")[1])["certificateIPs"])

    wait_until(lambda: "127.0.0.6" in certificate_ips(), 15, "the Service's address in the certificate")
    return server, certificate_ips


def move_service(lab, ip):
    """Patches the Service to ClusterIP `ip`; returns its resourceVersion now."""
    return lab.api("PATCH", f"{SERVICE}/x-tunnel-server-svc", {"spec": {"clusterIP": ip, "clusterIPs": [ip]}})[
        "metadata"]["resourceVersion"]


def version_of(line):
    return line.split("resourceVersion=")[1].split("&")[0].split(" ")[0]


@pytest.mark.parametrize("mode", ["reset", "end"])
def test_a_watch_cut_mid_stream_is_resumed_from_its_last_version_and_loses_no_event(lab, mode):
    """The Service's watch has delivered a change (127.0.0.7), then is cut where the next change (127.0.0.9) would
    come: by a TCP reset (a proxy or an API server going away), or ended cleanly (as timeoutSeconds ends it). The
    client watches again at once from the last version it saw, with no list: the change the cut kept from it is
    sent on the new watch and the certificate follows it. One new watch, not a loop."""
    server, certificate_ips = service_replica(lab)
    seen = move_service(lab, "127.0.0.7")
    wait_until(lambda: "127.0.0.7" in certificate_ips(), 10, "the first change delivered")
    (lab.kube / "watch-cut").write_text(f"{mode} services")
    move_service(lab, "127.0.0.9")
    wait_until(lambda: any(e[:2] == (mode.upper(), "services") for e in lab.events()), 10, f"the watch cut ({mode})")
    cut = next(e for e in lab.events() if e[:2] == (mode.upper(), "services"))
    assert cut[3] == seen, (cut, seen)  # cut after it had sent the first change
    wait_until(lambda: "127.0.0.9" in certificate_ips() and "127.0.0.7" not in certificate_ips(), 5,
               "the change the cut withheld, seen on the next watch")
    time.sleep(3)
    lines = [line for line in lab.requests() if "/services" in line and not line.startswith(("POST ", "PATCH "))]
    lists = [line for line in lines if line.startswith("GET ")]
    watches = [line for line in lines if line.startswith("WATCH ")]
    assert len(lists) == 1, lines  # the first list only: no list after the cut
    assert len(watches) == 2 and version_of(watches[1]) == seen, lines
    if mode == "reset":  # said once, with the version it watches from
        assert "the watch of Service kube-system/x-tunnel-server-svc was cut" in server.text()
        assert f"watching again from version {seen}" in server.text()
    assert server.alive()


def test_watches_ended_at_their_timeout_are_resumed_from_their_version_without_a_hot_loop(lab):
    """The client asks every watch to end (timeoutSeconds), and the API server ends it cleanly then; here every watch
    ends after 2 s, as a proxy in front of the API server may end it sooner. Each next watch starts at once from the
    version the last one ended at (its last event or bookmark), with no list; about one watch per 2 s, no more; and a
    Lease written meanwhile (another replica's) is counted."""
    (lab.kube / "watch-seconds").write_text("2")
    lab.start_server(0)
    wait_until(lambda: lab.replicas(0) == 1, 20, "the count from the one Lease")
    began = len(lab.requests())
    time.sleep(5)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    lab.api("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases", {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "edge-tunnel-server-r9", "labels": {"k8s-app": "edge-tunnel-server"}},
        "spec": {"holderIdentity": "r9", "leaseDurationSeconds": 60, "renewTime": now, "acquireTime": now}})
    wait_until(lambda: lab.replicas(0) == 2, 5, "the other replica's Lease counted")
    time.sleep(3)
    window = lab.requests()[began:]
    watches = [line for line in window if line.startswith("WATCH ") and "/leases?" in line]
    assert all("timeoutSeconds=" in line for line in watches), watches
    assert 3 <= len(watches) <= 6, watches  # 8 s of watches ended every 2 s: 4, and 5 once the timing straddles
    assert not [line for line in lab.requests() if line.startswith("GET ") and "/leases?" in line][1:], lab.requests()
    ends = [e[3] for e in lab.events() if e[:2] == ("TIMEOUT", "leases")]
    resumed = [version_of(line) for line in [line for line in lab.requests() if line.startswith("WATCH ")
                                             and "/leases?" in line][1:]]
    assert resumed[:len(ends)] == ends[:len(resumed)] and len(ends) >= 3, (ends, resumed)


@pytest.mark.parametrize("mode", ["reset", "end"])
def test_watches_cut_at_once_back_off_instead_of_a_hot_loop(lab, mode):
    """A proxy that cuts every watch right after its headers (a reset, or a clean end with no event): a watch cut in
    less than a second with no event is a failure, and the client backs off (0.5-1 s, 1-2 s, 2-4 s, ...) before it
    lists and watches again, not watching again at once without end. Once watches stay up, the Leases are followed."""
    lab.start_server(0)
    wait_until(lambda: lab.replicas(0) == 1 and any(line.startswith("WATCH ") for line in lab.requests()), 20,
               "the replica following its Lease")
    (lab.kube / "watch-cut").write_text(f"{mode} leases at-once")
    (lab.kube / "compact").write_text("")  # the open watch ends (410): the next ones are cut
    lab.api("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases", None)
    wait_until(lambda: any(e[:2] == (mode.upper(), "leases") for e in lab.events()), 10, "a watch cut at once")
    first = len(lab.requests())
    time.sleep(6)
    watches = sum(1 for line in lab.requests()[first:] if line.startswith("WATCH "))
    assert 2 <= watches <= 4, watches  # waits of 0.5-1 s, 1-2 s, 2-4 s; a hot loop makes hundreds
    (lab.kube / "watch-cut").unlink()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    lab.api("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases", {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "edge-tunnel-server-r9", "labels": {"k8s-app": "edge-tunnel-server"}},
        "spec": {"holderIdentity": "r9", "leaseDurationSeconds": 60, "renewTime": now, "acquireTime": now}})
    wait_until(lambda: lab.replicas(0) == 2, 12, "the other replica's Lease counted once watches stay up")
