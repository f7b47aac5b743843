"""README's "A real deployment in five minutes", followed as a reader follows it (issue 29): a newcomer copies its
commands, so they must work as written, and must say what the product prints.

The commands are read from README.md's indented code blocks, never copied here: an edit of the README that breaks
the tour fails this test. Each block runs verbatim in bash, with `edgetunnel` being the binary under test and
`kubectl` a stand-in (written below) that logs every call: it makes `create secret generic` Secrets from the
literals and files named (reading the files as kubectl would), and plays `kubectl exec deploy/edge-tunnel-server
-- edgetunnel ...` on this machine against the real server the test runs, whose join state is in its PKI folder
(`--pki-dir` in place of `--join-state-namespace`: with no API server there are no ConfigMaps to keep it in). The
agent is the DaemonSet's container as the kubelet would run it, with its environment from the rendered manifests.

What cannot run here, and is not run: there is no Kubernetes API server and no registry, so step 1 (podman build
and push), `kubectl apply`, `get`, `delete` and `logs`, and kube-apiserver's egress selector of step 6 need a
cluster. For those the test checks what it can without one: that `scripts/build-image` takes step 1's flags and
that step 3 deploys the image step 1 names; that the rendered manifests validate; that step 5's `edgetunnel`
commands exist with the flags used; and that step 6's egress selector names the port of
x-tunnel-server-internal-svc and the client certificate step 2 issued.
"""
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from conftest import BIN, ROOT, run
from support.harness import Cluster, free_port, http_get, wait_until

README = ROOT / "README.md"
TOUR_HEADING = "## A real deployment in five minutes"
EDGE_CIDR = "192.168.30.0/24"
NODE = "edge-1"
NODE_IP = "192.168.30.7"  # an edge node's status.hostIP, inside the tour's edge network

# The tour's `kubectl` and `edgetunnel`, by the name it is called with: every call is appended to $TOUR_LOG.
STAND_IN = r'''#!/usr/bin/env python3
import json, os, subprocess, sys


def edgetunnel(args):
    done = subprocess.run([os.environ["TOUR_EDGETUNNEL"], *args], capture_output=True, text=True)
    return True, done.returncode, done.stdout, done.stderr


def create_secret(namespace, name, options):
    data = {}
    for option in options:
        kind, _, item = option.partition("=")
        key, _, value = item.partition("=")
        if kind == "--from-literal":
            data[key] = value
        elif kind == "--from-file":
            try:
                with open(value) as f:
                    data[key] = f.read()
            except OSError as error:
                return True, 1, "", f"error: {error}\n"
        else:
            return True, 1, "", f"stand-in kubectl: unknown option {option}\n"
    path = os.environ["TOUR_SECRETS"]
    secrets = json.load(open(path)) if os.path.exists(path) else {}
    secrets[f"{namespace}/{name}"] = data
    with open(path, "w") as f:
        json.dump(secrets, f)
    return True, 0, f"secret/{name} created\n", ""


def kubectl(args):
    namespace, words = ("default", args)
    if words[:1] == ["-n"] and len(words) > 1:
        namespace, words = words[1], words[2:]
    if words[:3] == ["create", "secret", "generic"] and len(words) > 3:
        return create_secret(namespace, words[3], words[4:])
    server_pki = os.environ.get("TOUR_SERVER_PKI")
    if words[:4] == ["exec", "deploy/edge-tunnel-server", "--", "edgetunnel"] and server_pki:
        inner = words[4:]
        # No API server here: the server keeps its join state in its PKI folder, not in the ConfigMaps of
        # --join-state-namespace.
        if "--join-state-namespace" in inner:
            at = inner.index("--join-state-namespace")
            inner[at:at + 2] = ["--pki-dir", server_pki]
        # In the pod, `status`'s default address is the server's own meta port.
        if inner[:1] == ["status"] and "--server" not in inner:
            if "TOUR_SERVER_META" not in os.environ:
                return False, 0, "", ""
            inner += ["--server", os.environ["TOUR_SERVER_META"]]
        return edgetunnel(inner)
    return False, 0, "", ""  # needs a cluster: not run here


tool = os.path.basename(sys.argv[0])
ran, code, out, err = (edgetunnel if tool == "edgetunnel" else kubectl)(sys.argv[1:])
with open(os.environ["TOUR_LOG"], "a") as log:
    log.write(json.dumps({"tool": tool, "argv": sys.argv[1:], "ran": ran, "rc": code, "stdout": out,
                          "stderr": err}) + "\n")
sys.stdout.write(out)
sys.stderr.write(err)
sys.exit(code)
'''


def tour_blocks():
    """The tour's indented code blocks by step number, each dedented, as a reader copies it."""
    text = README.read_text()
    assert TOUR_HEADING in text, f"README.md has no section {TOUR_HEADING!r}"
    section = text.split(TOUR_HEADING, 1)[1].split("\n## ", 1)[0]
    steps, step, block, previous = {}, None, None, ""
    for line in section.splitlines() + ["end"]:
        if line.startswith("    ") and (block is not None or not previous.strip()):
            block = (block or []) + [line[4:]]
        elif block is not None and not line.strip():
            block.append("")
        elif block is not None:
            steps.setdefault(step, []).append("\n".join(block).strip("\n") + "\n")
            block = None
        heading = re.match(r"\*\*(\d+)\. ", line)
        if heading:
            step = int(heading.group(1))
        previous = line
    assert sorted(steps) == [1, 2, 3, 4, 5, 6], f"the tour's steps with commands: {sorted(steps)}"
    return steps


def logical_lines(block):
    """The commands of a block, each as one line: a line ending in a backslash, or inside an open `$(`, goes on."""
    commands, current = [], ""
    for line in block.splitlines():
        current += line + "\n"
        if not line.endswith("\\") and current.count("$(") <= current.count(")"):
            commands.append(one_line(current))
            current = ""
    return [c for c in commands + [one_line(current)] if c]


def one_line(command):
    """A command as one line: line continuations joined, whitespace collapsed."""
    return " ".join(command.replace("\\\n", " ").split())


class Shell:
    """A folder where the tour's blocks run in bash, with the stand-ins on PATH and the Secrets they create."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        tools = self.folder / ".tools"
        tools.mkdir()
        script = tools / "stand_in.py"
        script.write_text(STAND_IN)
        script.chmod(0o755)
        for name in ("edgetunnel", "kubectl"):
            (tools / name).symlink_to(script)
        self.log = tools / "calls.jsonl"
        self.env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "TOUR_LOG": str(self.log),
                    "TOUR_EDGETUNNEL": str(BIN / "edgetunnel"), "TOUR_SECRETS": str(tools / "secrets.json")}
        for name in ("TOUR_SERVER_PKI", "TOUR_SERVER_META"):
            self.env.pop(name, None)

    def run(self, block, **env):
        """Runs `block` in bash; returns bash's result and the stand-ins' calls, in order."""
        self.log.write_text("")
        result = subprocess.run(["bash", "-c", block], cwd=self.folder, env={**self.env, **env},
                                capture_output=True, text=True, timeout=60)
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        return result, calls

    def secret(self, namespace, name):
        """A Secret the stand-in kubectl created (its data), or None."""
        path = self.folder / ".tools" / "secrets.json"
        return json.loads(path.read_text()).get(f"{namespace}/{name}") if path.exists() else None


def describe(result, calls):
    lines = [f"  {c['tool']} {shlex.join(c['argv'])}  -> {'rc ' + str(c['rc']) if c['ran'] else 'not run here'}"
             + (f"\n      {c['stderr'].strip()}" if c["stderr"].strip() else "") for c in calls]
    return "calls:\n" + "\n".join(lines) + f"\nbash's stderr:\n{result.stderr}"


class Tour:
    """Steps 2 and 3 run as written in one folder (they are the setup of every later step)."""

    def __init__(self, folder):
        self.blocks = tour_blocks()
        self.shell = Shell(folder)
        self.folder = self.shell.folder
        self.pki = self.folder / "pki"
        self.pki_result, self.pki_calls = self.shell.run(self.blocks[2][0])
        hashes = [c["stdout"].strip() for c in self.pki_calls if c["argv"][:2] == ["pki", "ca-hash"]]
        self.ca_hash = hashes[0] if hashes else None
        manifests_block = self.blocks[3][0]
        assert "sha256:HEX" in manifests_block, manifests_block
        self.manifests_result, self.manifests_calls = self.shell.run(
            manifests_block.replace("sha256:HEX", self.ca_hash or "sha256:HEX"))
        rendered = self.folder / "edge-tunnel.yaml"
        self.docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d] if rendered.exists() else []
        self.named = {(d["kind"], d["metadata"]["name"]): d for d in self.docs}

    def manifests_call(self):
        found = [c for c in self.manifests_calls if c["argv"][:1] == ["manifests"]]
        assert len(found) == 1, describe(self.manifests_result, self.manifests_calls)
        return found[0]

    def agent_container(self):
        return self.named[("DaemonSet", "edge-tunnel-agent")]["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    return Tour(tmp_path_factory.mktemp("tour"))


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


def bootstrap_command(stderr):
    """The Secret command `manifests` prints on stderr for the agents' token."""
    lines = [line for line in stderr.splitlines()
             if line.startswith("kubectl ") and "create secret generic edge-tunnel-bootstrap " in line]
    assert len(lines) == 1, stderr
    return lines[0]


def without_token(calls):
    """Calls comparable across runs: the token (printed once, different every time) masked."""
    return [(c["tool"], [re.sub(r"^(--from-literal=token=).+", r"\1<token>", a) for a in c["argv"]]) for c in calls]


def run_step_4(tour, shell, block, server_pki):
    """Step 4's block, its `kubectl exec` played on `server_pki`: returns the token in the Secret it created."""
    result, calls = shell.run(block, TOUR_SERVER_PKI=str(server_pki))
    executed = [c for c in calls if c["argv"][2:3] == ["exec"]]
    assert len(calls) == 2 and len(executed) == 1 and executed[0]["rc"] == 0, (
        "step 4 as written is not one `kubectl exec ... token create` inside one `kubectl create secret`; "
        + describe(result, calls))
    token = shell.secret("kube-system", "edge-tunnel-bootstrap")["token"]
    assert token and token == executed[0]["stdout"].strip(), describe(result, calls)
    server_yaml = yaml.safe_load(tour.named[("ConfigMap", "edge-tunnel-config")]["data"]["server.yaml"])
    argv = executed[0]["argv"]
    assert argv[argv.index("--join-state-namespace") + 1] == server_yaml["joinStateNamespace"], argv
    return token


def test_step_4_is_the_command_manifests_prints(tour, tmp_path):
    """Step 4 says `manifests` printed its command: the README's block is that command for the tour's edge CIDR, as
    text and as bash runs it (the same kubectl calls with the same arguments), so the two cannot drift apart."""
    printed = bootstrap_command(tour.manifests_call()["stderr"])
    block = tour.blocks[4][0]
    assert one_line(block) == printed
    assert f"--node-cidr {EDGE_CIDR}" in printed
    shell = Shell(tmp_path / "shell")
    server_pki = tmp_path / "server-pki"
    shutil.copytree(tour.pki, server_pki)
    env = {"TOUR_SERVER_PKI": str(server_pki)}
    printed_result, printed_calls = shell.run(printed + "\n", **env)
    readme_result, readme_calls = shell.run(block, **env)
    assert without_token(readme_calls) == without_token(printed_calls), (
        "README's step 4, run by bash, differs from the command manifests printed.\nREADME's "
        + describe(readme_result, readme_calls) + "\nmanifests' " + describe(printed_result, printed_calls))


def pod_environment(container, fields, secrets, config_maps):
    """The container's environment as the kubelet makes it: fieldRefs, Secret and ConfigMap keys (optional ones
    left out when missing)."""
    env = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        source = entry["valueFrom"]
        if "fieldRef" in source:
            env[entry["name"]] = fields[source["fieldRef"]["fieldPath"]]
            continue
        kind, store = ("secretKeyRef", secrets) if "secretKeyRef" in source else ("configMapKeyRef", config_maps)
        ref = source[kind]
        value = (store.get(ref["name"]) or {}).get(ref["key"])
        if value is None:
            assert ref.get("optional"), f"{entry['name']}: {kind} {ref} is missing"
            continue
        env[entry["name"]] = value
    return env


@pytest.fixture
def server(tour, tmp_path):
    """A real server on a copy of the tour's PKI, on loopback and free ports."""
    c = Cluster(tmp_path)
    shutil.rmtree(c.pki)
    shutil.copytree(tour.pki, c.pki)  # the tour's CA: the agents pin the hash step 2 printed
    c.ca_hash = tour.ca_hash
    try:
        c.start_server()
        yield c
    finally:
        c.close()


def agent_as_the_daemonset_runs_it(tour, c, shell, folder):
    """The DaemonSet's agent container on this machine: its command, args and environment as the kubelet gives
    them, on node edge-1 whose status.hostIP is NODE_IP. The pod's own paths become folders here, the server
    address the loopback server (the ConfigMap names the load balancer), and its meta port a free one."""
    container = tour.agent_container()
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in tour.docs if d["kind"] == "ConfigMap"}
    token = shell.secret("kube-system", "edge-tunnel-bootstrap")
    env = pod_environment(container, {"spec.nodeName": NODE, "status.hostIP": NODE_IP},
                          {"edge-tunnel-bootstrap": token} if token else {}, config_maps)
    folder.mkdir()
    addresses = folder / "server-addresses"
    addresses.write_text(f"127.0.0.1:{c.ports['tunnel']}\n")
    pod_paths = {"--server-addresses-file": addresses, "--pki-dir": folder / "pki"}
    args = []
    for arg in container["args"]:
        arg = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)  # the kubelet's $(VAR) expansion
        flag = arg.split("=", 1)[0]
        args.append(f"{flag}={pod_paths.pop(flag)}" if flag in pod_paths else arg)
    assert not pod_paths, f"the DaemonSet's agent no longer has {sorted(pod_paths)}: {container['args']}"
    meta = free_port()
    command = [BIN / container["command"][0], *args, "--meta-port", meta]
    return command, {"PATH": os.environ["PATH"], "HOME": str(folder), **env}, meta


def test_step_4_token_joins_the_daemonsets_agent(tour, server, tmp_path):
    """Step 4 as written, then the DaemonSet's agent as Kubernetes runs it. The server checks the node IP the
    agent claims (NODE_IP, from status.hostIP) against the token's --node-cidr networks, not the connection's
    source address, so an agent on loopback claiming an address in the edge network is the tour's join. Before the
    Secret exists the agent exits as step 5 says; with it, it joins and step 5's `node list` and `status` show it."""
    shell = Shell(tmp_path / "shell")
    command, env, meta = agent_as_the_daemonset_runs_it(tour, server, shell, tmp_path / "early")
    assert "BOOTSTRAP_TOKEN" not in env and env["NODE_IP"] == NODE_IP
    early = run(*command, check=False, env=env, timeout=30)
    assert early.returncode != 0 and "no --bootstrap-token to join with" in early.stderr, early.stderr

    run_step_4(tour, shell, tour.blocks[4][0], server.pki)
    command, env, meta = agent_as_the_daemonset_runs_it(tour, server, shell, tmp_path / "node")
    assert env["BOOTSTRAP_TOKEN"] and env["CA_CERT_HASH"] == tour.ca_hash
    agent = server.spawn(command, "agent", env=env, may_exit=True)  # a refused join exits: said below, not at teardown
    wait_until(lambda: not agent.alive() or http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200, 20,
               "the agent to join and connect")
    assert agent.alive(), f"the agent exited:\n{agent.text()}"
    assert {a["nodeName"]: a["nodeIPs"] for a in server.agents()} == {NODE: [NODE_IP]}
    san = run("openssl", "x509", "-in", tmp_path / "node" / "pki" / "agent.crt", "-noout", "-ext",
              "subjectAltName").stdout
    assert f"IP Address:{NODE_IP}" in san, san

    result, calls = shell.run(tour.blocks[5][0], TOUR_SERVER_PKI=str(server.pki),
                              TOUR_SERVER_META=server.meta_url(""))
    played = {c["argv"][c["argv"].index("edgetunnel") + 1]: c for c in calls if c["ran"]}
    assert sorted(played) == ["node", "status"], describe(result, calls)
    assert all(c["rc"] == 0 for c in played.values()), describe(result, calls)
    assert NODE in played["node"]["stdout"], played["node"]["stdout"]
    assert NODE in played["status"]["stdout"] and NODE_IP in played["status"]["stdout"], played["status"]["stdout"]
    assert agent.alive()


def test_step_4_without_node_cidr_every_join_is_refused(tour, server, tmp_path):
    """The trap step 4 warns about: the same command without --node-cidr makes a token that admits no node IP, and
    the DaemonSet's agent, which always claims its status.hostIP, is refused with "allows no node IPs"."""
    block = re.sub(r"--node-cidr[ \t]+[^\s)\"]+", "", tour.blocks[4][0])
    assert "--node-cidr" not in block and block != tour.blocks[4][0]
    shell = Shell(tmp_path / "shell")
    run_step_4(tour, shell, block, server.pki)
    command, env, _ = agent_as_the_daemonset_runs_it(tour, server, shell, tmp_path / "node")
    refused = run(*command, check=False, env=env, timeout=30)
    assert refused.returncode != 0, refused.stderr
    assert "allows no node IPs" in refused.stderr and "--node-cidr" in refused.stderr, refused.stderr
    assert not (tmp_path / "node" / "pki" / "agent.crt").exists()
    assert server.agents() == []


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
