"""Two joins at the same moment through two replicas that share the join state as ConfigMaps (--join-state-namespace)
in the stand-in API server: the API server's conflicts (409) decide, so exactly one join gets a certificate, and what
is stored is that join.

The joins are made simultaneous, not merely started together: each replica's TLS connection is set up first, then a
barrier releases both JOIN frames at once. Whether the two replicas' writes of the node's record actually met is
visible in the stand-in's request log (a create of an existing object answered 409): the race is played again, with a
fresh node, until they did: a replica that ignored that 409 would have given both joins a certificate. The stored
record is checked against the join that won.

(test_kube_api.py's `test_the_join_state_in_configmaps_is_shared_by_every_replica` plays the same joins without the
barrier; this module is where they are forced.)"""
import concurrent.futures
import datetime
import json
import socket
import ssl
import threading

from cryptography import x509

from conftest import BIN, run
from support.harness import http_get, read_frame, wait_until
from support.kube import join_frame, lab  # noqa: F401  (lab is a fixture)

NAMESPACE = ["--join-state-namespace", "edge-tunnel"]
NODE_RECORDS = "/api/v1/namespaces/edge-tunnel/configmaps?labelSelector=edgetunnel.io%2Fjoin-state%3Dnode"
IP_CLAIMS = "/api/v1/namespaces/edge-tunnel/configmaps?labelSelector=edgetunnel.io%2Fjoin-state%3Dip"
# Races played at most, each with a new node, until one shows the two record writes meeting.
ATTEMPTS = 12


def joins_at_once(lab, servers, payloads):
    """Each payload (a JOIN frame) to its replica's tunnel port, without a client certificate, all released by one
    barrier once every TLS handshake is done. Returns [(frame type, JSON payload)] in the order of `servers`."""
    barrier = threading.Barrier(len(servers), timeout=30)
    context = ssl.create_default_context(cafile=str(lab.pki / "ca.crt"))
    context.check_hostname = False

    def join(server, payload):
        with socket.create_connection(("127.0.0.1", server.ports["tunnel"]), timeout=20) as raw:
            with context.wrap_socket(raw) as tls:
                barrier.wait()
                tls.sendall(payload)
                frame_type, _, body = read_frame(tls)
        return frame_type, json.loads(body)

    with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
        return list(pool.map(join, servers, payloads))


def stored_records(lab, name):
    """The node records of `name` in the API server (the ConfigMaps' parsed `record`)."""
    items = lab.api("GET", NODE_RECORDS, None)["items"]
    return [r for r in (json.loads(o["data"]["record"]) for o in items) if r["name"] == name]


def parse_time(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def assert_stored_as_the_winner(lab, name, ip, answers):
    """Exactly one answer is JOIN_OK, with a certificate for `name` and `ip`; the one record stored for `name` is
    that join: joined, holding `ip`, not revoked, and (if it voids older certificates) accepting the winner's (valid
    from no earlier than the record's certificatesValidFrom, less the CA's 5-minute back-dating at most)."""
    assert sorted(t for t, _ in answers) == [14, 15], answers
    winner = next(body for t, body in answers if t == 14)
    certificate = x509.load_pem_x509_certificate(winner["certificatePEM"].encode())
    assert certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == name
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == [ip], sans
    records = stored_records(lab, name)
    assert len(records) == 1, records
    record = records[0]
    assert record.get("joined") and not record.get("revoked") and record["ips"] == [ip], record
    if record.get("certificatesValidFrom"):
        not_before = certificate.not_valid_before_with_utc if hasattr(certificate, "not_valid_before_with_utc") \
            else certificate.not_valid_before.replace(tzinfo=datetime.timezone.utc)
        assert not_before + datetime.timedelta(minutes=5, seconds=1) >= parse_time(record["certificatesValidFrom"]), \
            (record, not_before)
    return next(body for t, body in answers if t == 15)["reason"]


def record_creates_refused(lab, since):
    """Creates of a ConfigMap in the join state's namespace that the API server refused with 409 (AlreadyExists),
    since request `since`."""
    return sum(1 for line in lab.requests()[since:]
               if line == "POST /api/v1/namespaces/edge-tunnel/configmaps 409")


def replicas(lab):
    servers = [lab.start_server(i, *NAMESPACE, "--state-dir", lab.tmp / f"state-{i}") for i in (1, 2)]
    for server in servers:
        wait_until(lambda: http_get(server.meta + "/readyz")[0] == 200, 20, "replica ready")
    token = run(BIN / "edgetunnel", "token", "create", "--node-cidr", "127.0.0.0/8", "--kubeconfig", lab.kubeconfig,
                *NAMESPACE).stdout.strip()
    return servers, token


def test_two_joins_of_one_new_name_at_once_give_one_certificate_and_store_that_join(lab):
    """One new name, one join through each replica, released together, each naming an IP of its own (so that no
    claim of an IP orders them: the two replicas' creates of the node's record are what meet): one certificate, one
    "has already joined"; the record is the winner's join, with the winner's IP, and the loser's IP claim is given
    back. Repeated with new names until the creates met (the stand-in refused one with 409): until then, nothing
    showed that a replica heeds that 409."""
    servers, token = replicas(lab)
    raced = 0
    for attempt in range(ATTEMPTS):
        name, ips = f"edge-{20 + attempt}", [f"127.0.3.{2 * attempt + 1}", f"127.0.3.{2 * attempt + 2}"]
        payloads = [join_frame(lab, token, name, ip=ip) for ip in ips]
        before = len(lab.requests())
        answers = joins_at_once(lab, servers, payloads)
        won = [t for t, _ in answers].index(14) if 14 in [t for t, _ in answers] else None
        assert won is not None, answers
        reason = assert_stored_as_the_winner(lab, name, ips[won], answers)
        assert f"{name} has already joined" in reason, answers
        lost_ip = ips[1 - won]
        wait_until(lambda: lost_ip not in [json.loads(o["data"]["claim"])["ip"]
                                           for o in lab.api("GET", IP_CLAIMS, None)["items"]], 5,
                   f"the losing join's claim of {lost_ip} given back")
        refused = record_creates_refused(lab, before)
        assert refused in (0, 1), (refused, lab.requests()[before:])
        if refused:
            raced += 1
            break
    print(f"the creates of the record met in race {attempt + 1}")
    assert raced, f"in {ATTEMPTS} races the replicas' creates of the node record never met: the conflict was not tested"


def test_two_new_names_naming_one_ip_at_once_give_it_to_one_and_store_only_that_join(lab):
    """Two names, one IP, released together through the two replicas: the IP's claim object lets one have it; the
    claim names the winner, whose record holds the IP, and the loser has no record."""
    servers, token = replicas(lab)
    for attempt in range(3):
        names, ip = (f"edge-{40 + 2 * attempt}", f"edge-{41 + 2 * attempt}"), f"127.0.4.{attempt + 1}"
        answers = joins_at_once(lab, servers, [join_frame(lab, token, name, ip=ip) for name in names])
        assert sorted(t for t, _ in answers) == [14, 15], answers
        winner = names[[t for t, _ in answers].index(14)]
        loser = names[[t for t, _ in answers].index(15)]
        reason = assert_stored_as_the_winner(lab, winner, ip, answers)
        assert f"node IP {ip}" in reason, answers
        assert stored_records(lab, loser) == [] or not stored_records(lab, loser)[0].get("joined"), \
            stored_records(lab, loser)
        claims = [json.loads(o["data"]["claim"]) for o in lab.api("GET", IP_CLAIMS, None)["items"]]
        assert [c["node"] for c in claims if c["ip"] == ip] == [winner], claims
