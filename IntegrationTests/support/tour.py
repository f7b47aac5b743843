"""README's tour for test_readme_tour*.py: its indented code blocks by step (read from README.md, never copied), a
`Shell` that runs a block verbatim in bash with the stand-ins for `edgetunnel` and `kubectl` on PATH (`STAND_IN`,
which logs every call), and `Tour`, steps 2 and 3 run as written; `tour` is its module-scoped fixture (a test module
that uses it imports it)."""
import json
import os
import pathlib
import re
import shlex
import subprocess

import pytest
import yaml

from support.binaries import BIN, ROOT

README = ROOT / "README.md"
TOUR_HEADING = "## A real deployment in five minutes"


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
