"""README's "A real deployment in five minutes", followed as a reader follows it (issue 29): a newcomer copies its
commands, so they must work as written, and must say what the product prints.

The commands are read from README.md's indented code blocks, never copied here: an edit of the README that breaks
the tour fails this test. Each block runs verbatim in bash, with `edgetunnel` being the binary under test and
`kubectl` a stand-in (support/tour.py) that logs every call: it makes `create secret generic` Secrets from the
literals and files named (reading the files as kubectl would), and plays `kubectl exec deploy/edge-tunnel-server
-- edgetunnel ...` on this machine against the real server the test runs, whose join state is in its PKI folder
(`--pki-dir` in place of `--join-state-namespace`: with no API server there are no ConfigMaps to keep it in). The
agent is the DaemonSet's container as the kubelet would run it, with its environment from the rendered manifests.

What cannot run here, and is not run: there is no Kubernetes API server and no registry, so step 1 (podman build
and push), `kubectl apply`, `get`, `delete` and `logs`, and kube-apiserver's egress selector of step 6 need a
cluster. For those the test checks what it can without one: that `scripts/build-image` takes step 1's flags and
that step 3 deploys the image step 1 names; that the rendered manifests validate; that step 5's `edgetunnel`
commands exist with the flags used; and that step 6's egress selector names the port of
x-tunnel-server-internal-svc and the client certificate step 2 issued. Step 4 (the join, and the DaemonSet's
agent) is in test_readme_tour_join.py.
"""
import pathlib
import re
import shlex
import shutil

import pytest
import yaml

from conftest import BIN, ROOT, run
from support.tour import one_line, describe
from support.tour import tour  # noqa: F401  (fixture)


def logical_lines(block):
    """The commands of a block, each as one line: a line ending in a backslash, or inside an open `$(`, goes on."""
    commands, current = [], ""
    for line in block.splitlines():
        current += line + "\n"
        if not line.endswith("\\") and current.count("$(") <= current.count(")"):
            commands.append(one_line(current))
            current = ""
    return [c for c in commands + [one_line(current)] if c]


def test_step_2_pki_as_written(tour):
    """The PKI commands run as written from an empty folder: `ca-hash` prints the pin the agents need, kube-apiserver's
    client certificate lands in ./pki, and the CA Secret's command names the files `pki init` wrote."""
    calls = tour.pki_calls
    tools = [(c["tool"], c["argv"][:2]) for c in calls]
    assert tools == [("edgetunnel", ["pki", "init"]), ("edgetunnel", ["pki", "ca-hash"]),
                     ("edgetunnel", ["pki", "issue-client"]), ("kubectl", ["-n", "kube-system"])], describe(
        tour.pki_result, calls)
    for c in calls:
        assert c["ran"] and c["rc"] == 0, describe(tour.pki_result, calls)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", tour.ca_hash), tour.ca_hash
    assert run(BIN / "edgetunnel", "pki", "ca-hash", "--pki-dir", tour.pki).stdout.strip() == tour.ca_hash
    for name in ("kube-apiserver.crt", "kube-apiserver.key"):
        assert (tour.pki / name).is_file(), sorted(p.name for p in tour.pki.iterdir())
    verified = run("openssl", "verify", "-CAfile", tour.pki / "ca.crt", tour.pki / "kube-apiserver.crt")
    assert verified.stdout.strip().endswith("OK")
    ca = tour.shell.secret("kube-system", "edge-tunnel-ca")
    assert ca == {"ca.crt": (tour.pki / "ca.crt").read_text(), "ca.key": (tour.pki / "ca.key").read_text()}


def test_step_3_manifests_as_written(tour):
    """`manifests` with the step's flags (the real CA hash for sha256:HEX) renders valid YAML: the server Deployment
    on step 1's image, its Services, and the agent DaemonSet that claims status.hostIP and reads the bootstrap
    token from the Secret step 4 creates. `kubectl apply` and `get svc` need a cluster: not run here."""
    call = tour.manifests_call()
    assert call["rc"] == 0, describe(tour.manifests_result, tour.manifests_calls)
    assert [(c["tool"], c["ran"]) for c in tour.manifests_calls] == [
        ("edgetunnel", True), ("kubectl", False), ("kubectl", False)], describe(tour.manifests_result,
                                                                               tour.manifests_calls)
    assert call["stdout"] == (tour.folder / "edge-tunnel.yaml").read_text()
    kinds = {d["kind"] for d in tour.docs}
    assert {"Deployment", "DaemonSet"} <= kinds, kinds
    if shutil.which("kubernetes-validate") is None:
        pytest.fail("kubernetes-validate is not installed (scripts/test installs it)")
    validation = run("kubernetes-validate", "--strict", "-k", "1.30.0", tour.folder / "edge-tunnel.yaml", check=False)
    assert validation.returncode == 0, validation.stdout + validation.stderr

    image = shlex.split(tour.blocks[1][0].splitlines()[0])
    tag = image[image.index("--tag") + 1]
    for kind, name in [("Deployment", "edge-tunnel-server"), ("DaemonSet", "edge-tunnel-agent")]:
        assert tour.named[(kind, name)]["spec"]["template"]["spec"]["containers"][0]["image"] == tag
    assert tour.named[("ConfigMap", "edge-tunnel-config")]["data"]["ca-cert-hash"] == tour.ca_hash

    env = {e["name"]: e.get("valueFrom") for e in tour.agent_container()["env"]}
    assert env["NODE_IP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}, env
    assert env["BOOTSTRAP_TOKEN"]["secretKeyRef"]["name"] == "edge-tunnel-bootstrap", env
    assert env["BOOTSTRAP_TOKEN"]["secretKeyRef"]["key"] == "token", env
    svc = tour.named[("Service", "x-tunnel-server-svc")]
    assert svc["spec"]["type"] == "LoadBalancer"  # its EXTERNAL-IP is what the tour points the DNS name at


def test_edgetunnel_commands_run_in_the_server_pod_exist_with_their_flags(tour):
    """Every `kubectl exec ... -- edgetunnel ...` of the tour names a subcommand that exists and only flags its
    help lists (the commands themselves need the server pod; see the join test for them played here)."""
    commands = []
    for step in (4, 5):
        for block in tour.blocks[step]:
            for line in logical_lines(block):
                for part in line.split(" -- ")[1:]:
                    words = shlex.split(part.split(")", 1)[0])
                    assert words[0] == "edgetunnel", line
                    commands.append(words[1:])
    subcommands = {tuple(w for w in words[:2] if not w.startswith("-")) for words in commands}
    assert subcommands == {("token", "create"), ("node", "list"), ("status",)}, subcommands
    for words in commands:
        subcommand = [w for w in words[:2] if not w.startswith("-")]
        help_text = run(BIN / "edgetunnel", *subcommand, "--help").stdout
        for flag in (w for w in words if w.startswith("--")):
            assert re.search(rf"(^|[\s\[]){re.escape(flag)}(?![\w-])", help_text), f"{flag} not in {subcommand} --help"


def test_steps_1_and_6_agree_with_what_the_tour_made(tour, tmp_path):
    """Step 1 needs podman and a registry, step 6 kube-apiserver: `scripts/build-image` takes step 1's flags (it
    stops only at the missing binaries), and step 6's egress selector uses the port of the Service it names, over
    HTTP CONNECT, with the CA and client certificate step 2 made."""
    build, push = tour.blocks[1][0].splitlines()
    words = shlex.split(build)
    assert words[0] == "scripts/build-image" and shlex.split(push)[:2] == ["podman", "push"]
    assert shlex.split(push)[2] == words[words.index("--tag") + 1]
    empty = tmp_path / "no-binaries"
    empty.mkdir()
    result = run(ROOT / words[0], *words[1:], "--bin-dir", empty, check=False, cwd=ROOT)
    assert result.returncode == 1 and "no such executable" in result.stderr, result.stderr

    egress = yaml.safe_load(tour.blocks[6][0])
    assert egress["kind"] == "EgressSelectorConfiguration"
    connection = egress["egressSelections"][0]["connection"]
    assert connection["proxyProtocol"] == "HTTPConnect"
    url = connection["transport"]["tcp"]["url"]
    internal = tour.named[("Service", "x-tunnel-server-internal-svc")]
    assert url == f"https://CLUSTER-IP:{internal['spec']['ports'][0]['port']}", url
    files = {k: pathlib.Path(v).name for k, v in connection["transport"]["tcp"]["tlsConfig"].items()}
    assert files == {"caBundle": "ca.crt", "clientCert": "kube-apiserver.crt", "clientKey": "kube-apiserver.key"}
    assert all((tour.pki / name).is_file() for name in files.values())
