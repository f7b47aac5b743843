"""`edgetunnel manifests` with real files, a real server and a real agent: the rendered documents validate and
match the plan, the token command for the edge CIDRs, pools (two of them, private-line only, a rendered pool
file driving a real agent), the CA secret and the join-state claim, and bad input. `plan` is in test_plan.py,
`doctor` and `probe udp` in test_plan_doctor.py.
"""
import json
import shutil

import pytest
import yaml

from conftest import BIN, assert_one_line_error, run
from support.harness import Cluster, free_port, http_get, wait_until
from support.pools import MIXED_POOLS, MIXED_POOLS_FILE


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
