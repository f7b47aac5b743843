"""`edgetunnel plan`, `manifests`, `doctor` and `probe udp` with real files, a real server and real namespaces."""
import json
import pathlib
import shutil
import signal

import pytest
import yaml

from conftest import BIN, assert_one_line_error, run
from harness import Cluster, Proc, free_port, stop_and_check, wait_until
from netns import sh, two_hosts

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
FIXTURES = HERE / "fixtures"

GOLDEN_CASES = {
    "internet-new": ["--connectivity", "internet", "--kubernetes-version", "1.30.2", "--edge-cidr", "192.168.10.0/24"],
    "express-old-existing": ["--connectivity", "express-connect", "--kubernetes-version", "v1.18.8-aliyun.1",
                             "--existing-cluster", "--no-has-eip", "--edge-cidr", "192.168.10.0/24",
                             "--edge-cidr", "192.168.20.0/24", "--region-id", "cn-hangzhou",
                             "--security-group-id", "sg-123"],
    "express-between-public-noeip": ["--connectivity", "express-connect", "--kubernetes-version", "1.21.3",
                                     "--public-apiserver", "--internet-egress", "--existing-cluster", "--no-has-eip",
                                     "--edge-cidr", "10.8.0.0/16"],
    "express-new-nodepool": ["--connectivity", "express-connect", "--kubernetes-version", "1.22.15",
                             "--no-cloud-edge-container-network", "--edge-cidr", "10.8.0.0/16"],
}


def plan(*args, check=True):
    return run(BIN / "edgetunnel", "plan", *args, check=check)


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_plan_output_matches_the_golden_files(name):
    args = GOLDEN_CASES[name]
    text = plan(*args).stdout
    data = plan(*args, "--output", "json").stdout
    assert text == (GOLDEN / f"plan-{name}.txt").read_text(), f"text differs for {name}"
    assert json.loads(data) == json.loads((GOLDEN / f"plan-{name}.json").read_text()), f"json differs for {name}"


def test_plan_json_schema_is_stable():
    data = json.loads(plan(*GOLDEN_CASES["express-old-existing"], "--output", "json").stdout)
    assert data["schemaVersion"] == 1
    assert set(data) == {"schemaVersion", "input", "snat", "eip", "tunnelService", "privateLine",
                         "securityGroupRules", "findings"}
    assert data["tunnelService"] == {"name": "x-tunnel-server-svc", "namespace": "kube-system", "type": "ClusterIP",
                                     "reason": data["tunnelService"]["reason"]}
    assert data["privateLine"]["path"] == "reconfigure-tunnel"
    assert data["input"]["kubernetesVersion"] == "1.18.8"
    rule = data["securityGroupRules"][0]
    assert rule["command"] == ("aliyun ecs AuthorizeSecurityGroup --RegionId cn-hangzhou --SecurityGroupId sg-123 "
                               "--IpProtocol udp --PortRange 8472/8472 --SourceCidrIp 192.168.10.0/24 --Policy accept "
                               "--Priority 1 --Description \"VXLAN container network from edge 192.168.10.0/24\"")


def test_plan_from_a_file_equals_the_flags(tmp_path):
    f = tmp_path / "cluster.yaml"
    f.write_text(yaml.safe_dump({"connectivity": "express-connect", "kubernetesVersion": "v1.18.8-aliyun.1",
                                 "existingCluster": True, "hasEIP": False,
                                 "edgeCIDRs": ["192.168.10.0/24", "192.168.20.0/24"]}))
    from_file = json.loads(plan("--file", f, "--region-id", "cn-hangzhou", "--security-group-id", "sg-123",
                                "--output", "json").stdout)
    from_flags = json.loads(plan(*GOLDEN_CASES["express-old-existing"], "--output", "json").stdout)
    assert from_file == from_flags


@pytest.mark.parametrize("args,needle", [
    (["--connectivity", "carrier-pigeon", "--kubernetes-version", "1.22.0"], "carrier-pigeon"),
    (["--connectivity", "internet", "--kubernetes-version", "1.x"], "1.x"),
    (["--connectivity", "internet", "--kubernetes-version", "1.22.0", "--edge-cidr", "10.0.0.0/33"], "10.0.0.0/33"),
    (["--connectivity", "internet", "--kubernetes-version", "1.22.0", "--has-eip"], "--existing-cluster"),
    (["--kubernetes-version", "1.22.0"], "--connectivity"),
    (["--connectivity", "internet"], "--kubernetes-version"),
])
def test_plan_bad_input_is_one_line_and_exit_2(args, needle):
    result = plan(*args, check=False)
    assert result.returncode == 2
    assert_one_line_error(result, needle)


def test_manifests_validate_and_the_service_matches_the_document(tmp_path):
    if shutil.which("kubernetes-validate") is None:
        pytest.fail("kubernetes-validate is not installed (scripts/test installs it)")
    for mode, service_type in [("internet", "LoadBalancer"), ("express-connect", "ClusterIP")]:
        out = tmp_path / f"{mode}.yaml"
        out.write_text(run(BIN / "edgetunnel", "manifests", "--mode", mode, "--replicas", "3",
                           "--server-address", "172.21.3.4:10262", "--server-address", "tunnel.example.com:10262",
                           "--ca-cert-hash", "sha256:" + "ab" * 32, "--cert-ip", "172.21.3.4").stdout)
        validation = run("kubernetes-validate", "--strict", "-k", "1.30.0", out, check=False)
        assert validation.returncode == 0, validation.stdout + validation.stderr
        docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
        kinds = sorted(d["kind"] for d in docs)
        assert kinds == sorted(["ServiceAccount", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service",
                                "Service", "Service", "Deployment", "PodDisruptionBudget", "DaemonSet", "ClusterRole",
                                "ClusterRoleBinding", "Namespace", "Role", "RoleBinding"])
        svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "x-tunnel-server-svc")
        assert svc["metadata"]["namespace"] == "kube-system"
        assert svc["metadata"]["labels"] == {"name": "edge-tunnel-server"}
        assert svc["spec"]["type"] == service_type
        assert svc["spec"]["selector"] == {"k8s-app": "edge-tunnel-server"}
        assert svc["spec"]["sessionAffinity"] == "None"
        # Agents reach a replica before it is ready (it is ready once they all hold tunnels to it) ...
        assert svc["spec"]["publishNotReadyAddresses"] is True
        assert svc["spec"]["ports"] == [
            {"name": "https", "port": 10263, "protocol": "TCP", "targetPort": 10263},
            {"name": "tcp", "port": 10262, "protocol": "TCP", "targetPort": 10262}]
        headless = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "x-tunnel-server-headless")
        assert headless["spec"]["clusterIP"] == "None"
        # ... and callers use a Service of ready replicas only: none answers 502 for a node not attached to it yet.
        callers = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "x-tunnel-server-internal-svc")
        assert callers["spec"]["type"] == "ClusterIP" and "publishNotReadyAddresses" not in callers["spec"]
        assert callers["spec"]["selector"] == {"k8s-app": "edge-tunnel-server"}
        assert callers["spec"]["ports"] == [{"name": "https", "port": 10263, "protocol": "TCP", "targetPort": 10263}]
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        assert deployment["spec"]["replicas"] == 3
        probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
        # Ready once every joined node holds a tunnel to the replica (see test_replicas.py).
        assert probe["httpGet"] == {"path": "/readyz", "port": 10265}
        pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": {"k8s-app": "edge-tunnel-server"}}}
        spread = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        term = spread["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["server.yaml"]
        assert "serverCount: 3" in config.splitlines() and "leaseNamespace: kube-system" in config.splitlines(), config
        role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == "kube-system")
        assert role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                  "verbs": ["get", "list", "watch", "create", "update", "delete"]},
                                 {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]}]
        assert ("addressService: kube-system/x-tunnel-server-svc,kube-system/x-tunnel-server-internal-svc"
                in config.splitlines()), config
        assert "checkNodeObjects: true" in config.splitlines(), config
        cluster_role = next(d for d in docs if d["kind"] == "ClusterRole")
        assert cluster_role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}]
        ds = next(d for d in docs if d["kind"] == "DaemonSet")
        assert ds["spec"]["template"]["spec"]["nodeSelector"] == {"alibabacloud.com/is-edge-worker": "true"}
        # The agent's stream buffers are bounded at 96 MiB plus ~25 MiB idle: its limit must hold both (it
        # was 128Mi against a 256 MiB budget).
        limit = ds["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        assert limit.endswith("Mi") and int(limit[:-2]) >= 96 + 25 + 16, limit
        server_limit = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        assert server_limit == "1Gi"  # --max-buffered-mib 512 plus the server's own
        config = next(d for d in docs if d["kind"] == "ConfigMap")
        assert config["data"]["server-addresses"] == "172.21.3.4:10262,tunnel.example.com:10262"
        assert "certIPs: [172.21.3.4]" in config["data"]["server.yaml"]
        # Shared PKI: the CA from a Secret (read-only), each replica's own certificates in its own emptyDir, the
        # join state as ConfigMaps in a namespace of its own, where alone the server may write ConfigMaps; the
        # server runs as the image's user, its volumes its group's.
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["ca"]["secret"]["secretName"] == "edge-tunnel-ca"
        assert "emptyDir" in volumes["state"] and "join-state" not in volumes
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        server_yaml = yaml.safe_load(config["data"]["server.yaml"])
        assert mounts["ca"]["mountPath"] == server_yaml["caDir"] and mounts["ca"]["readOnly"] is True
        assert mounts["state"]["mountPath"] == server_yaml["stateDir"] == server_yaml["pkiDir"]
        assert server_yaml["joinStateNamespace"] == "edge-tunnel"
        assert next(d for d in docs if d["kind"] == "Namespace")["metadata"]["name"] == "edge-tunnel"
        join_role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == "edge-tunnel")
        assert join_role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                                       "verbs": ["get", "list", "watch", "create", "update", "delete"]}]
        join_binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["namespace"] == "edge-tunnel")
        assert join_binding["subjects"] == [{"kind": "ServiceAccount", "name": "edge-tunnel-server", "namespace": "kube-system"}]
        assert pod["containers"][0]["args"][0] == "--config=" + mounts["config"]["mountPath"] + "/server.yaml"
        assert pod["securityContext"]["runAsUser"] == 65532 and pod["securityContext"]["fsGroup"] == 65532
        assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "localhost/edgetunnel:0.1.0"


def test_manifests_render_the_ca_secret_and_a_join_state_claim(tmp_path):
    """`--pki-dir` adds the CA Secret the replicas mount; `--join-state-claim` keeps the join state on a shared
    volume instead of ConfigMaps."""
    pki = tmp_path / "pki"
    run(BIN / "edgetunnel", "pki", "init", "--pki-dir", pki)
    out = tmp_path / "m.yaml"
    out.write_text(run(BIN / "edgetunnel", "manifests", "--mode", "express-connect", "--replicas", "1", "--pki-dir", pki,
                       "--ca-secret", "my-ca", "--join-state-claim", "my-state",
                       "--join-state-storage-class", "nfs").stdout)
    validation = run("kubernetes-validate", "--strict", "-k", "1.30.0", out, check=False)
    assert validation.returncode == 0, validation.stdout + validation.stderr
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert secret["metadata"]["name"] == "my-ca"
    assert secret["stringData"] == {"ca.crt": (pki / "ca.crt").read_text(), "ca.key": (pki / "ca.key").read_text()}
    assert "Namespace" not in [d["kind"] for d in docs]
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "my-state"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["storageClassName"] == "nfs"
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["ca"]["secret"]["secretName"] == "my-ca"
    assert volumes["join-state"]["persistentVolumeClaim"]["claimName"] == "my-state"
    server_yaml = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["server.yaml"])
    assert "joinStateNamespace" not in server_yaml and server_yaml["pkiDir"] == "/var/lib/edge-tunnel-server/pki"


def test_manifests_bad_input():
    for args, needle in [(["--mode", "satellite"], "satellite"), (["--mode", "internet", "--replicas", "0"], "--replicas"),
                         (["--mode", "internet", "--edge-node-selector", "novalue"], "novalue"),
                         (["--mode", "internet", "--server-address", "nope"], "nope"),
                         (["--mode", "internet", "--ca-cert-hash", "md5:1"], "md5:1"),
                         (["--mode", "internet", "--ca-secret", "Bad_Name"], "Bad_Name"),
                         (["--mode", "internet", "--join-state-namespace", "a.b"], "a.b"),
                         (["--mode", "internet", "--join-state-namespace", "kube-system"], "kube-system"),
                         (["--mode", "internet", "--pki-dir", "/nonexistent-pki"], "/nonexistent-pki")]:
        result = run(BIN / "edgetunnel", "manifests", *args, check=False)
        assert result.returncode == 2, args
        assert_one_line_error(result, needle)


def doctor(*args, check=False):
    return run(BIN / "edgetunnel", "doctor", *args, check=check)


def test_doctor_checks_the_servers_certificate_against_each_address(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_server("--bind-address", "0.0.0.0", "--cert-ips", "127.0.0.1")
        tunnel = c.ports["tunnel"]
        ok = doctor("--server-address", f"127.0.0.1:{tunnel}", "--ca-file", c.ca)
        assert ok.returncode == 0, ok.stdout
        assert ok.stdout.startswith("PASS  tls 127.0.0.1") and "covers 127.0.0.1" in ok.stdout
        # 127.0.0.2 reaches the same server, but its certificate does not name that address.
        uncovered = doctor("--server-address", f"127.0.0.2:{tunnel}", "--ca-file", c.ca)
        assert uncovered.returncode == 1
        assert "does not cover 127.0.0.2" in uncovered.stdout and "certIPs" in uncovered.stdout
        other = tmp_path / "other"
        run(BIN / "edgetunnel", "pki", "init", "--pki-dir", other)
        wrong_ca = doctor("--server-address", f"127.0.0.1:{tunnel}", "--ca-file", other / "ca.crt")
        assert wrong_ca.returncode == 1 and "not issued by the CA" in wrong_ca.stdout
        closed = doctor("--server-address", f"127.0.0.1:{free_port()}", "--ca-file", c.ca)
        assert closed.returncode == 1 and "no TLS answer" in closed.stdout
        as_json = json.loads(doctor("--server-address", f"127.0.0.2:{tunnel}", "--ca-file", c.ca, "--output", "json").stdout)
        assert as_json[0]["status"] == "fail" and "certIPs" in as_json[0]["fix"]
    finally:
        c.close()


def test_doctor_checks_service_type_per_mode():
    lb, cip = FIXTURES / "svc-loadbalancer.yaml", FIXTURES / "svc-clusterip.yaml"
    assert doctor("--mode", "internet", "--service-file", lb).returncode == 0
    wrong = doctor("--mode", "express-connect", "--service-file", lb)
    assert wrong.returncode == 1
    assert "type LoadBalancer, but express-connect needs ClusterIP" in wrong.stdout and "kubectl" in wrong.stdout
    assert doctor("--mode", "express-connect", "--service-file", cip).returncode == 0


def test_doctor_checks_udp_8472_in_the_security_group():
    allow, drop = FIXTURES / "sg-allow.json", FIXTURES / "sg-drop.json"
    ok = doctor("--security-group-file", allow, "--edge-cidr", "192.168.10.0/24", "--edge-cidr", "192.168.20.0/24")
    assert ok.returncode == 0, ok.stdout
    bad = doctor("--security-group-file", drop, "--edge-cidr", "192.168.10.0/24", "--edge-cidr", "192.168.20.0/24")
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert lines[0].startswith("PASS") and "192.168.10.0/24" in lines[0]
    assert lines[1].startswith("FAIL") and "dropped" in lines[1] and "AuthorizeSecurityGroup" in lines[1]
    outside = doctor("--security-group-file", allow, "--edge-cidr", "10.0.0.0/8")
    assert outside.returncode == 1 and "no rule accepts" in outside.stdout


def test_doctor_bad_input(tmp_path):
    (tmp_path / "sg.json").write_text("{not json")
    for args, needle in [([], "nothing to check"), (["--server-address", "x:1"], "--ca-file"),
                         (["--service-file", FIXTURES / "svc-clusterip.yaml"], "--mode"),
                         (["--security-group-file", tmp_path / "sg.json", "--edge-cidr", "10.0.0.0/8"], "sg.json"),
                         (["--security-group-file", tmp_path / "missing.json"], "missing.json"),
                         (["--probe-udp", "nowhere"], "nowhere")]:
        result = doctor(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert_one_line_error(result, needle)


def test_udp_probe_between_two_namespaces_and_doctor_follows(tmp_path):
    with two_hosts() as (a, ip_a, b, ip_b):
        responder = Proc(["ip", "netns", "exec", b, BIN / "edgetunnel", "probe", "udp", "--listen", f"{ip_b}:8472"],
                         tmp_path / "responder.log")
        try:
            wait_until(lambda: "\n" in responder.text(), 10, "the responder's first line")
            assert "answering UDP probes" in responder.text().splitlines()[0]
            probe = sh("ip", "netns", "exec", a, BIN / "edgetunnel", "probe", "udp", "--target", f"{ip_b}:8472",
                       "--count", "5", "--timeout", "1s", "--output", "json")
            result = json.loads(probe.stdout)
            assert result["sent"] == 5 and result["received"] == 5 and result["rttMillisecondsMax"] > 0
            passing = sh("ip", "netns", "exec", a, BIN / "edgetunnel", "doctor", "--probe-udp", f"{ip_b}:8472", check=False)
            assert passing.returncode == 0 and "PASS  udp" in passing.stdout

            # The cloud host's firewall drops VXLAN: the probe and doctor's verdict follow.
            sh("ip", "netns", "exec", b, "iptables", "-A", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP")
            blocked = sh("ip", "netns", "exec", a, BIN / "edgetunnel", "probe", "udp", "--target", f"{ip_b}:8472",
                         "--count", "3", "--timeout", "1s", check=False)
            assert blocked.returncode == 1 and blocked.stdout.startswith("0/3 probes")
            failing = sh("ip", "netns", "exec", a, BIN / "edgetunnel", "doctor", "--probe-udp", f"{ip_b}:8472", check=False)
            assert failing.returncode == 1 and "FAIL  udp" in failing.stdout and "0/5 probes came back" in failing.stdout
        finally:
            # Killed on purpose (it keeps the default SIGTERM action); it must not have exited before that.
            responder.stop(signal.SIGKILL)
            stop_and_check([responder])


def test_probe_bad_input():
    for args, needle in [(["--target", "10.0.0.1"], "10.0.0.1"), ([], "exactly one"),
                         (["--listen", "127.0.0.1:1", "--target", "127.0.0.1:2"], "exactly one"),
                         (["--target", "127.0.0.1:9", "--count", "0"], "--count"),
                         (["--target", "127.0.0.1:9", "--timeout", "soon"], "--timeout")]:
        result = run(BIN / "edgetunnel", "probe", "udp", *args, check=False)
        assert result.returncode == 2, args
        assert_one_line_error(result, needle)
