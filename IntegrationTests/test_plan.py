"""`edgetunnel plan`, `manifests`, `doctor` and `probe udp` with real files, a real server and real namespaces."""
import json
import pathlib
import shutil
import signal

import pytest
import yaml

from conftest import BIN, assert_one_line_error, run
from support.harness import Cluster, Proc, free_port, http_get, stop_and_check, wait_until
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
    golden = json.loads((GOLDEN / f"plan-{name}.json").read_text())
    # A plan with an error finding is still printed in full, and exits 1.
    expected_code = 1 if any(f["severity"] == "error" for f in golden["findings"]) else 0
    text = plan(*args, check=False)
    data = plan(*args, "--output", "json", check=False)
    assert (text.returncode, data.returncode, text.stderr, data.stderr) == (expected_code, expected_code, "", "")
    assert text.stdout == (GOLDEN / f"plan-{name}.txt").read_text(), f"text differs for {name}"
    assert json.loads(data.stdout) == golden, f"json differs for {name}"


def test_plan_exits_1_with_an_error_finding():
    """Issue 29: an existing cluster without an EIP that needs one is printed with its error, and exits 1."""
    args = ["--connectivity", "express-connect", "--public-apiserver", "--existing-cluster", "--no-has-eip",
            "--kubernetes-version", "1.24.6"]
    for extra in ([], ["--output", "json"]):
        result = plan(*args, *extra, check=False)
        assert result.returncode == 1 and result.stderr == "", result
        assert "the existing cluster has no EIP" in result.stdout
    # The same cluster with its EIP holds: 0.
    assert plan(*args[:-3], "--has-eip", *args[-2:], check=False).returncode == 0


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


MIXED_POOLS = ["--pool", "hz=express-connect,cidr=10.20.0.0/16,cidr=10.21.0.0/16",
               "--pool", "sh=internet,cidr=192.168.30.0/24,selector-style=ack"]
MIXED_POOLS_FILE = {"pools": [
    {"name": "hz", "connectivity": "express-connect", "cidrs": ["10.20.0.0/16", "10.21.0.0/16"]},
    {"name": "sh", "connectivity": "internet", "cidrs": ["192.168.30.0/24"],
     "nodeSelector": {"alibabacloud.com/nodepool-id": "sh"}}]}


def test_plan_with_mixed_pools_from_flags_and_from_a_file(tmp_path):
    """A private-line pool and an internet pool in one 1.22+ cluster: each pool's servers and rules."""
    from_flags = plan("--kubernetes-version", "1.24.6", *MIXED_POOLS, "--output", "json")
    f = tmp_path / "pools.yaml"
    f.write_text(yaml.safe_dump({"kubernetesVersion": "1.24.6", **MIXED_POOLS_FILE}))
    from_file = plan("--file", f, "--output", "json")
    assert json.loads(from_flags.stdout) == json.loads(from_file.stdout)
    data = json.loads(from_flags.stdout)
    assert data["schemaVersion"] == 1
    # The cluster as a whole: an internet pool needs the public load balancer and an EIP.
    assert data["eip"]["needed"] is True and data["snat"]["needed"] is False
    assert data["tunnelService"]["type"] == "LoadBalancer"
    assert data["lineService"]["name"] == "x-tunnel-server-line-svc" and data["lineService"]["type"] == "ClusterIP"
    assert data["privateLine"]["path"] == "dedicated-node-pool"
    assert [f["severity"] for f in data["findings"]] == ["info"]
    hz, sh = data["pools"]
    assert hz["nodeSelector"] == {"apps.openyurt.io/nodepool": "hz"}
    assert sh["nodeSelector"] == {"alibabacloud.com/nodepool-id": "sh"}
    assert [(x["service"], x["type"], x["path"]) for x in hz["servers"]] == [
        ("x-tunnel-server-line-svc", "ClusterIP", "private-line"), ("x-tunnel-server-svc", "LoadBalancer", "internet")]
    assert [(x["service"], x["path"]) for x in sh["servers"]] == [("x-tunnel-server-svc", "internet")]
    rules = lambda pool: [(r["ipProtocol"], r["portRange"], r["sourceCidrIp"]) for r in pool["securityGroupRules"]]
    assert rules(hz) == [("udp", "8472/8472", "10.20.0.0/16"), ("udp", "8472/8472", "10.21.0.0/16"),
                         ("tcp", "10262/10262", "10.20.0.0/16"), ("tcp", "10262/10262", "10.21.0.0/16")]
    # The internet pool's agents arrive through the load balancer: no TCP 10262 from its network.
    assert rules(sh) == [("udp", "8472/8472", "192.168.30.0/24")]
    assert [(r["ipProtocol"], r["portRange"], r["sourceCidrIp"]) for r in data["securityGroupRules"]] == rules(hz) + rules(sh)
    assert data["input"]["edgeCIDRs"] == ["10.20.0.0/16", "10.21.0.0/16", "192.168.30.0/24"]
    text = plan("--kubernetes-version", "1.24.6", *MIXED_POOLS).stdout
    assert "Pools:" in text and "  hz (express-connect): 10.20.0.0/16, 10.21.0.0/16; nodes apps.openyurt.io/nodepool=hz" in text
    assert ("servers: kube-system/x-tunnel-server-line-svc (ClusterIP, private-line), "
            "then kube-system/x-tunnel-server-svc (LoadBalancer, internet)") in text


# Every version line of the source document, for a mixed cluster and for one whose pools are all on the line:
# before 1.20.11 the whole tunnel is reconfigured (so pools cannot differ), from 1.20.11 up to 1.22 no route to
# the line exists, from 1.22 each pool chooses.
@pytest.mark.parametrize("version,mixed_code,line_code,path", [
    ("1.18.8", 1, 0, "reconfigure-tunnel"),
    ("1.20.10", 1, 0, "reconfigure-tunnel"),
    ("v1.20.10-aliyun.1", 1, 0, "reconfigure-tunnel"),
    ("1.20.11", 1, 1, "upgrade"),
    ("v1.20.11-aliyun.1", 1, 1, "upgrade"),
    ("1.21.0", 1, 1, "upgrade"),
    ("1.21.14", 1, 1, "upgrade"),
    ("1.22.0", 0, 0, "dedicated-node-pool"),
    ("1.22.15", 0, 0, "dedicated-node-pool"),
    ("1.30.2", 0, 0, "dedicated-node-pool"),
])
def test_plan_pools_at_every_version_boundary(version, mixed_code, line_code, path):
    mixed = plan("--kubernetes-version", version, *MIXED_POOLS, "--output", "json", check=False)
    assert mixed.returncode == mixed_code and mixed.stderr == "", mixed
    data = json.loads(mixed.stdout)
    assert data["privateLine"]["path"] == path
    errors = [f["message"] for f in data["findings"] if f["severity"] == "error"]
    if path == "reconfigure-tunnel":
        assert len(errors) == 1 and "cannot be mixed" in errors[0] and "whole tunnel" in errors[0]
    elif path == "upgrade":
        assert len(errors) == 1 and errors[0].startswith("pool hz is express-connect") and "1.22" in errors[0]
    else:
        assert errors == []
    line = plan("--kubernetes-version", version, MIXED_POOLS[0], MIXED_POOLS[1], check=False)
    assert line.returncode == line_code, line.stdout
    # Internet pools alone never contradict a version.
    assert plan("--kubernetes-version", version, MIXED_POOLS[2], MIXED_POOLS[3], check=False).returncode == 0


@pytest.mark.parametrize("pool,needle", [
    ("hz", "NAME=express-connect"),
    ("Bad_Name=internet", "Bad_Name"),
    ("hz=satellite", "pool hz: connectivity \"satellite\""),
    ("hz=internet,cidr=10.0.0.0/33", "pool hz: cidr \"10.0.0.0/33\""),
    ("hz=internet,colour=red", "pool hz: unknown key \"colour\""),
    ("hz=internet,selector=novalue", "pool hz: selector \"novalue\""),
    ("hz=internet,selector=a/b/c=x", "pool hz: selector label key \"a/b/c\""),
    ("hz=internet,selector=k=bad value", "pool hz: selector value"),
    ("hz=internet,selector-style=k8s", "pool hz: selector-style \"k8s\""),
    ("hz=internet,selector=a=b,selector-style=ack", "pool hz: selector and selector-style"),
    ("a-name-that-is-much-too-long-for-a-pool-name-here=internet", "at most 40"),
])
def test_plan_pool_flags_bad_input_is_one_line_and_exit_2(pool, needle):
    result = plan("--kubernetes-version", "1.24.6", "--pool", pool, check=False)
    assert result.returncode == 2
    assert_one_line_error(result, needle)


@pytest.mark.parametrize("pools,needle", [
    ([{"name": "hz"}], "pools[0] (pool hz): connectivity is missing"),
    ([{"connectivity": "internet"}], "pools[0]: name is missing"),
    ([{"name": "hz", "connectivity": "internet", "cidrs": ["10.0.0.0/8", "nope"]}], "pool hz): cidrs \"nope\""),
    ([{"name": "hz", "connectivity": "internet", "nodeSelector": "apps.openyurt.io/nodepool=hz"}],
     "pool hz): nodeSelector must be a mapping"),
    ([{"name": "hz", "connectivity": "internet", "nodeSelector": {"k": "a b"}}], "pool hz): nodeSelector value"),
    ([{"name": "hz", "connectivity": "internet", "selectorStyle": "kubernetes"}], "pool hz): selectorStyle"),
    ([{"name": "hz", "connectivity": "internet", "zone": "a"}], "pool hz): unknown key \"zone\""),
    ([{"name": "hz", "connectivity": "internet"}, {"name": "hz", "connectivity": "express-connect"}],
     "pool hz: the name is given twice"),
    ([{"name": "a", "connectivity": "internet", "nodeSelector": {"site": "x"}},
      {"name": "b", "connectivity": "internet", "nodeSelector": {"site": "x"}}], "pools a and b have the same node selector"),
    ("hz", "pools must be a list"),
])
def test_plan_pool_file_bad_input_names_the_pool_and_the_key(tmp_path, pools, needle):
    f = tmp_path / "pools.yaml"
    f.write_text(yaml.safe_dump({"kubernetesVersion": "1.24.6", "pools": pools}))
    result = plan("--file", f, check=False)
    assert result.returncode == 2
    assert_one_line_error(result, str(f), needle)


def test_plan_pools_contradicting_the_cluster_flags_are_refused():
    for args, needle in [(["--connectivity", "express-connect"], "contradicts pool sh"),
                         (["--edge-cidr", "10.0.0.0/8"], "--edge-cidr with pools")]:
        result = plan("--kubernetes-version", "1.24.6", *MIXED_POOLS, *args, check=False)
        assert result.returncode == 2
        assert_one_line_error(result, needle)
    # Repeating what the pools say is fine.
    assert plan("--kubernetes-version", "1.24.6", "--connectivity", "express-connect", *MIXED_POOLS[:2]).returncode == 0


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
        # The Roles' rules are held to what the server really asks the API for in test_kube_api.py, which loads
        # these very Roles into the stand-in API server and fails on a refusal or on a grant never used.
        assert ("addressService: kube-system/x-tunnel-server-svc,kube-system/x-tunnel-server-internal-svc"
                in config.splitlines()), config
        assert "checkNodeObjects: true" in config.splitlines(), config
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
        # The agents read their addresses from the ConfigMap as a file, which they re-read: moving them to the
        # private line is an edit of the ConfigMap, without a restart (an environment variable would need one).
        agent = ds["spec"]["template"]["spec"]["containers"][0]
        assert "--server-addresses-file=/etc/edge-tunnel/addresses/server-addresses" in agent["args"]
        assert not any("configMapKeyRef" in e.get("valueFrom", {}) and e["valueFrom"]["configMapKeyRef"]["key"] ==
                       "server-addresses" for e in agent["env"])
        ds_volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
        assert ds_volumes["addresses"]["configMap"] == {
            "name": "edge-tunnel-config", "items": [{"key": "server-addresses", "path": "server-addresses"}]}
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
        assert any(d["kind"] == "Role" and d["metadata"]["namespace"] == "edge-tunnel" for d in docs)
        join_binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["namespace"] == "edge-tunnel")
        assert join_binding["subjects"] == [{"kind": "ServiceAccount", "name": "edge-tunnel-server", "namespace": "kube-system"}]
        assert pod["containers"][0]["args"][0] == "--config=" + mounts["config"]["mountPath"] + "/server.yaml"
        assert pod["securityContext"]["runAsUser"] == 65532 and pod["securityContext"]["fsGroup"] == 65532
        assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "localhost/edgetunnel:0.1.0"


def token_commands(stderr):
    """The `edgetunnel token create ...` part of each Secret command `manifests` prints, by Secret name."""
    commands = {}
    for line in stderr.splitlines():
        if line.startswith("kubectl ") and " create secret generic " in line:
            secret = line.split(" create secret generic ", 1)[1].split()[0]
            commands[secret] = line.split(" -- ", 1)[1].rsplit(')"', 1)[0]
    return commands


def test_manifests_print_the_token_command_with_the_edge_cidrs(tmp_path):
    """Issue 29: the DaemonSet claims status.hostIP, so its token must name the edge networks; `manifests` prints
    the command that creates it (stderr, so the YAML on stdout stays clean), and that command works."""
    result = run(BIN / "edgetunnel", "manifests", "--mode", "internet", "--edge-cidr", "192.168.10.0/24",
                 "--edge-cidr", "192.168.20.0/24")
    assert result.stdout.startswith("apiVersion:") and "kubectl" not in result.stdout
    commands = token_commands(result.stderr)
    assert commands == {"edge-tunnel-bootstrap": "edgetunnel token create --join-state-namespace edge-tunnel "
                        "--node-cidr 192.168.10.0/24 --node-cidr 192.168.20.0/24 --description edge-agents"}
    assert ("kubectl -n kube-system create secret generic edge-tunnel-bootstrap --from-literal=token=\"$(kubectl -n "
            "kube-system exec deploy/edge-tunnel-server -- edgetunnel token create") in result.stderr
    # The same networks from a plan file; without any, a placeholder that fails loudly if pasted as it is.
    f = tmp_path / "plan.yaml"
    f.write_text(yaml.safe_dump({"edgeCIDRs": ["192.168.10.0/24", "192.168.20.0/24"]}))
    from_file = run(BIN / "edgetunnel", "manifests", "--mode", "internet", "--file", f)
    assert token_commands(from_file.stderr) == commands
    bare = run(BIN / "edgetunnel", "manifests", "--mode", "internet", "--join-state-claim", "state")
    assert token_commands(bare.stderr)["edge-tunnel-bootstrap"] == (
        "edgetunnel token create --pki-dir /var/lib/edge-tunnel-server/pki --node-cidr EDGE-CIDR --description edge-agents")
    assert "No --edge-cidr was given" in bare.stderr


def test_manifests_with_two_pools(tmp_path):
    """One express-connect pool and one internet pool: a DaemonSet and a ConfigMap of addresses each, both Services,
    a certificate naming every pool's addresses, a token command per pool naming its networks."""
    if shutil.which("kubernetes-validate") is None:
        pytest.fail("kubernetes-validate is not installed (scripts/test installs it)")
    out = tmp_path / "pools.yaml"
    result = run(BIN / "edgetunnel", "manifests", *MIXED_POOLS, "--public-address", "tunnel.example.com:10262",
                 "--ca-cert-hash", "sha256:" + "ab" * 32, "--cert-ip", "172.21.3.4")
    out.write_text(result.stdout)
    validation = run("kubernetes-validate", "--strict", "-k", "1.30.0", out, check=False)
    assert validation.returncode == 0, validation.stdout + validation.stderr
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    named = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(named) == len(docs)

    # Both Services: the public one (a load balancer: a pool is on the internet) and the one over the line.
    public = named[("Service", "x-tunnel-server-svc")]
    assert public["spec"]["type"] == "LoadBalancer"
    line = named[("Service", "x-tunnel-server-line-svc")]
    assert line["spec"]["type"] == "ClusterIP" and line["spec"]["publishNotReadyAddresses"] is True
    assert line["spec"]["selector"] == {"k8s-app": "edge-tunnel-server"}
    assert line["spec"]["ports"] == [{"name": "tcp", "port": 10262, "protocol": "TCP", "targetPort": 10262}]

    # The certificate names every pool's addresses, and follows the line Service's ClusterIP.
    server_yaml = yaml.safe_load(named[("ConfigMap", "edge-tunnel-config")]["data"]["server.yaml"])
    assert server_yaml["certIPs"] == ["172.21.3.4"]
    assert server_yaml["certDNSNames"] == ["x-tunnel-server-line-svc.kube-system.svc", "tunnel.example.com"]
    assert server_yaml["addressService"].split(",") == [
        "kube-system/x-tunnel-server-svc", "kube-system/x-tunnel-server-internal-svc", "kube-system/x-tunnel-server-line-svc"]
    assert "server-addresses" not in named[("ConfigMap", "edge-tunnel-config")]["data"]
    assert ("DaemonSet", "edge-tunnel-agent") not in named

    def addresses(pool):
        text = named[("ConfigMap", f"edge-tunnel-pool-{pool}")]["data"]["server-addresses"]
        return [line for line in text.splitlines() if line and not line.startswith("#")], text

    hz, _ = addresses("hz")
    assert hz == ["x-tunnel-server-line-svc.kube-system.svc:10262", "tunnel.example.com:10262"]
    sh, sh_text = addresses("sh")
    assert sh == ["tunnel.example.com:10262"]
    assert "#   x-tunnel-server-line-svc.kube-system.svc:10262" in sh_text  # the edit that moves it is spelled out

    for pool, selector in [("hz", {"apps.openyurt.io/nodepool": "hz"}), ("sh", {"alibabacloud.com/nodepool-id": "sh"})]:
        ds = named[("DaemonSet", f"edge-tunnel-agent-{pool}")]
        labels = {"k8s-app": "edge-tunnel-agent", "edgetunnel.io/pool": pool}
        assert ds["spec"]["selector"]["matchLabels"] == labels
        assert ds["spec"]["template"]["metadata"]["labels"] == labels
        pod = ds["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == selector
        agent = pod["containers"][0]
        assert "--server-addresses-file=/etc/edge-tunnel/addresses/server-addresses" in agent["args"]
        assert "--ca-cert-hash=$(CA_CERT_HASH)" in agent["args"]
        env = {e["name"]: e.get("valueFrom") for e in agent["env"]}
        assert env["BOOTSTRAP_TOKEN"]["secretKeyRef"]["name"] == f"edge-tunnel-bootstrap-{pool}"
        assert env["NODE_IP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
        assert env["EDGE_TUNNEL_POOL"] == {"fieldRef": {"fieldPath": "metadata.labels['edgetunnel.io/pool']"}}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["addresses"]["configMap"]["name"] == f"edge-tunnel-pool-{pool}"
        mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
        assert mounts["addresses"] == "/etc/edge-tunnel/addresses"

    commands = token_commands(result.stderr)
    assert commands == {
        "edge-tunnel-bootstrap-hz": "edgetunnel token create --join-state-namespace edge-tunnel --node-cidr 10.20.0.0/16 "
                                    "--node-cidr 10.21.0.0/16 --description edge-pool-hz",
        "edge-tunnel-bootstrap-sh": "edgetunnel token create --join-state-namespace edge-tunnel "
                                    "--node-cidr 192.168.30.0/24 --description edge-pool-sh"}
    # The printed command works (here against a PKI folder instead of the cluster's ConfigMaps) and its token
    # admits exactly the pool's networks.
    pki = tmp_path / "pki"
    run(BIN / "edgetunnel", "pki", "init", "--pki-dir", pki)
    args = commands["edge-tunnel-bootstrap-hz"].split()[1:]
    args[args.index("--join-state-namespace"):args.index("--join-state-namespace") + 2] = ["--pki-dir", str(pki)]
    run(BIN / "edgetunnel", *args)
    tokens = json.loads(run(BIN / "edgetunnel", "token", "list", "--pki-dir", pki, "--output", "json").stdout)
    assert [(t["description"], t["nodeCIDRs"]) for t in tokens] == [("edge-pool-hz", ["10.20.0.0/16", "10.21.0.0/16"])]

    # The pools from a plan file give the same objects.
    f = tmp_path / "plan.yaml"
    f.write_text(yaml.safe_dump(MIXED_POOLS_FILE))
    from_file = run(BIN / "edgetunnel", "manifests", "--file", f, "--public-address", "tunnel.example.com:10262",
                    "--ca-cert-hash", "sha256:" + "ab" * 32, "--cert-ip", "172.21.3.4")
    assert from_file.stdout == result.stdout and from_file.stderr == result.stderr


def test_manifests_with_private_line_pools_only(tmp_path):
    """Every pool on the line: x-tunnel-server-svc is ClusterIP (the document's step 1), no public address."""
    result = run(BIN / "edgetunnel", "manifests", "--pool", "hz=express-connect,cidr=10.20.0.0/16",
                 "--pool", "bj=express-connect,cidr=10.30.0.0/16,selector=site=beijing",
                 "--line-address", "172.21.9.9:10262")
    out = tmp_path / "line.yaml"
    out.write_text(result.stdout)
    validation = run("kubernetes-validate", "--strict", "-k", "1.30.0", out, check=False)
    assert validation.returncode == 0, validation.stdout + validation.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    named = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert named[("Service", "x-tunnel-server-svc")]["spec"]["type"] == "ClusterIP"
    assert named[("DaemonSet", "edge-tunnel-agent-bj")]["spec"]["template"]["spec"]["nodeSelector"] == {"site": "beijing"}
    for pool in ("hz", "bj"):
        text = named[("ConfigMap", f"edge-tunnel-pool-{pool}")]["data"]["server-addresses"]
        assert [line for line in text.splitlines() if not line.startswith("#")] == ["172.21.9.9:10262"]
    server_yaml = yaml.safe_load(named[("ConfigMap", "edge-tunnel-config")]["data"]["server.yaml"])
    assert server_yaml["certIPs"] == ["172.21.9.9"] and "certDNSNames" not in server_yaml


def test_a_rendered_pool_file_drives_a_real_agent_and_one_edit_moves_it(tmp_path):
    """The internet pool's rendered addresses file, its printed token command and its certificate names, with a
    real server and agent: the agent joins with the token and dials the public address; the documented edit (the
    line address first) moves it to the line address with no restart."""
    c = Cluster(tmp_path)
    try:
        tunnel = c.ports["tunnel"]
        line, public = f"127.0.0.2:{tunnel}", f"127.0.0.1:{tunnel}"
        rendered = run(BIN / "edgetunnel", "manifests", "--pool", "hz=express-connect,cidr=10.20.0.0/16",
                       "--pool", "lo=internet,cidr=127.0.0.0/8", "--line-address", line, "--public-address", public)
        docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
        named = {(d["kind"], d["metadata"]["name"]): d for d in docs}
        server_yaml = yaml.safe_load(named[("ConfigMap", "edge-tunnel-config")]["data"]["server.yaml"])
        assert server_yaml["certIPs"] == ["127.0.0.2", "127.0.0.1"]
        # The server's certificate names what the manifests' server config names: without 127.0.0.2 the agent
        # would refuse the line address.
        c.start_server("--bind-address", "0.0.0.0", *[a for ip in server_yaml["certIPs"] for a in ("--cert-ips", ip)])
        args = token_commands(rendered.stderr)["edge-tunnel-bootstrap-lo"].split()[1:]
        args[args.index("--join-state-namespace"):args.index("--join-state-namespace") + 2] = ["--pki-dir", str(c.pki)]
        token = run(BIN / "edgetunnel", *args).stdout.strip()

        addresses = tmp_path / "server-addresses"
        text = named[("ConfigMap", "edge-tunnel-pool-lo")]["data"]["server-addresses"]
        addresses.write_text(text)
        port = c.start_edge_service()
        meta = free_port()
        agent = c.spawn([BIN / "edge-tunnel-agent", "--node-name", "edge-lo-1", "--node-ip", "127.0.0.1",
                         "--server-addresses-file", addresses, "--pki-dir", tmp_path / "agent", "--bootstrap-token",
                         token, "--ca-cert-hash", c.ca_hash, "--meta-port", meta, "--allow", f"127.0.0.1:{port}"],
                        "agent-lo")

        def path_in_use():
            status, body = http_get(f"http://127.0.0.1:{meta}/readyz")
            return body.rsplit(" ", 1)[-1].strip() if status == 200 and body.startswith("ok") else None

        wait_until(lambda: path_in_use() == public, 30, "the agent on the public address")
        assert c.curl(f"http://edge-lo-1:{port}/hello").stdout == "hello from the edge\n"

        # The edit the ConfigMap's own comment describes, written as the kubelet writes it (a rename).
        edited = [line] + [entry for entry in text.splitlines() if entry and not entry.startswith("#")]
        staged = tmp_path / "staged"
        staged.write_text("\n".join(edited) + "\n")
        staged.rename(addresses)
        pid = agent.popen.pid
        wait_until(lambda: path_in_use() == line, 30, "the agent on the line address")
        assert agent.alive() and agent.popen.pid == pid
        assert c.curl(f"http://edge-lo-1:{port}/hello").stdout == "hello from the edge\n"
    finally:
        c.close()


def test_manifests_pool_bad_input():
    for args, needle in [
        (MIXED_POOLS, "pool sh is internet: give --public-address"),
        (MIXED_POOLS[:2] + ["--public-address", "tunnel.example.com:10262"], "no pool is internet"),
        (MIXED_POOLS + ["--public-address", "nope"], "--public-address \"nope\""),
        (MIXED_POOLS + ["--public-address", "t.example.com:10262", "--line-address", "x"], "--line-address \"x\""),
        (MIXED_POOLS + ["--public-address", "t.example.com:10262", "--mode", "express-connect"], "contradicts pool sh"),
        (MIXED_POOLS + ["--public-address", "t.example.com:10262", "--server-address", "a:1"], "--server-address"),
        (MIXED_POOLS + ["--public-address", "t.example.com:10262", "--edge-cidr", "10.0.0.0/8"], "--edge-cidr"),
        (["--pool", "hz=express-connect,cidr=300.1.0.0/16"], "pool hz: cidr \"300.1.0.0/16\""),
        (["--mode", "internet", "--public-address", "t.example.com:10262"], "give --pool too"),
        ([], "--mode is required"),
    ]:
        result = run(BIN / "edgetunnel", "manifests", *args, check=False)
        assert result.returncode == 2, args
        assert_one_line_error(result, needle)


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
            sh("ip", "netns", "exec", b, "iptables", "-w", "-A", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP")
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
