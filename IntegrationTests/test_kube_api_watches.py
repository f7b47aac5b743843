"""Lists and watches against a stand-in for the Kubernetes API server (kube_standin.py: there is no kube-apiserver
on these machines; it serves paged lists, bookmarks, ERROR events and watches that end or are cut): bookmarks move
the watch version, an ERROR event and watches cut at once back off, lists follow an empty page, and a watch cut
mid-stream or ended by its timeout resumes from its last version. Leases, Services, Nodes and RBAC are in
test_kube_api.py, the join state in test_kube_api_join_state.py.

RBAC is the manifests': every test's stand-in authorizes the server's requests (its ServiceAccount's token) with the
Roles, ClusterRoles and bindings that `edgetunnel manifests` renders, and a test whose server (or `edgetunnel token|
node`, which run in the server's pod) was refused by them fails, unless it expects refusals. The tests' own requests
(`Lab.api`, as kubectl) carry a cluster admin's token.
"""
import datetime
import json
import ssl
import time
import urllib.error
import urllib.request

import pytest

from support.harness import http_get, wait_until
from support.kube import lab  # noqa: F401  (lab is a fixture)


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
