"""`edgetunnel plan` with real files: the golden outputs, the JSON schema, a file equal to the flags, pools at every
version boundary, and bad input. `manifests` is in test_plan_manifests.py, `doctor` and `probe udp` in
test_plan_doctor.py."""
import json
import pathlib

import pytest
import yaml

from conftest import BIN, assert_one_line_error, run
from support.pools import MIXED_POOLS, MIXED_POOLS_FILE

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN = HERE / "golden"

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
