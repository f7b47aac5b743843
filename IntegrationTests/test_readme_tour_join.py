"""README's "A real deployment in five minutes", step 4, followed as a reader follows it (issue 29): the join command
is the one `edgetunnel manifests` printed, its token joins the DaemonSet's agent (run as the kubelet would run its
container, with its environment from the rendered manifests) to the real server, and without `--node-cidr` every
join is refused. The commands are read from README.md's code blocks and run verbatim in bash with the stand-ins of
support/tour.py; the other steps are in test_readme_tour.py, which says what cannot run here.
"""
import os
import re
import shutil

import pytest
import yaml

from conftest import BIN, run
from support.harness import Cluster, free_port, http_get, wait_until
from support.tour import one_line, Shell, describe
from support.tour import tour  # noqa: F401  (fixture)

EDGE_CIDR = "192.168.30.0/24"
NODE = "edge-1"
NODE_IP = "192.168.30.7"  # an edge node's status.hostIP, inside the tour's edge network


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
