"""Replicas counted by coordination.k8s.io Leases, against a stand-in for the Kubernetes API server
(kube_standin.py: there is no kube-apiserver on these machines; it serves the Lease endpoints the client uses,
with the API reference's JSON shapes, 410 Gone for compacted versions, 401 for a stale token and 403 from RBAC);
the Services the certificate follows, the Nodes agents register as, and the manifests' RBAC enforced per verb. The
join state in ConfigMaps is in test_kube_api_join_state.py, lists and watches in test_kube_api_watches.py.

RBAC is the manifests': every test's stand-in authorizes the server's requests (its ServiceAccount's token) with the
Roles, ClusterRoles and bindings that `edgetunnel manifests` renders, and a test whose server (or `edgetunnel token|
node`, which run in the server's pod) was refused by them fails, unless it expects refusals. The tests' own requests
(`Lab.api`, as kubectl) carry a cluster admin's token.
"""
import copy
import json
import signal
import time
import urllib.error
import urllib.request

import pytest
import yaml

from conftest import BIN, run
from support.harness import free_port, http_get, wait_until
from support.kube import edge_1_agent, lab, manifests  # noqa: F401  (lab is a fixture)


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
