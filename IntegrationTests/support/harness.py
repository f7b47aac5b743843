"""Starts real EdgeTunnel processes for end-to-end tests and talks to them with real clients."""
import json
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request

from support.binaries import BIN, run

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
from freeport import free_port  # noqa: E402  (shared with scripts/bench)

HERE = pathlib.Path(__file__).resolve().parents[1]  # IntegrationTests/: the stand-ins run from there by path


def wait_until(predicate, timeout, what):
    """Calls `predicate` until it returns a true value, for at most `timeout` seconds.

    An exception from `predicate` counts as "not yet" (a port that does not listen yet refuses, a log file that does
    not exist yet), but it is not lost: the timeout's AssertionError names the last one and chains it, so that a
    predicate that fails for a reason of its own (a typo, a changed JSON shape) shows that reason, not only a timeout.
    """
    deadline = time.monotonic() + timeout
    last_error, last_raised = None, False
    while True:
        try:
            if predicate():
                return
            last_raised = False
        except Exception as error:  # noqa: BLE001 - recorded, and re-raised (chained) at the timeout
            last_error, last_raised = error, True
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    message = f"timed out after {timeout}s waiting for {what}"
    if last_error is not None:
        when = "the last check" if last_raised else "an earlier check"
        message += f"; {when} raised {type(last_error).__name__}: {last_error}"
    raise AssertionError(message) from last_error


def holds_for(predicate, seconds, what, interval=0.1):
    """Asserts that `predicate` stays true for `seconds`, checked every `interval` (a "nothing happens for N s"
    check: the time is the point, and the first moment it fails ends the test, with how long it held)."""
    started = time.monotonic()
    while True:
        assert predicate(), f"{what}: no longer true after {time.monotonic() - started:.1f} of {seconds}s"
        if time.monotonic() - started >= seconds:
            return
        time.sleep(interval)


def http_get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


# The Python stand-ins (edge_service.py, kubelet_standin.py) keep Python's default SIGTERM action.
PYTHON_HELPER_EXITS = (0, -signal.SIGTERM)
# Signals that mean the process crashed (a Swift `precondition`/`fatalError` traps with SIGILL or SIGTRAP).
CRASH_SIGNALS = {signal.SIGILL, signal.SIGTRAP, signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE}
# What a Swift runtime trap prints.
CRASH_WORDS = ("Fatal error",)
# The EdgeTunnel binaries drain for up to 10 s on SIGTERM: the harness waits longer than that before SIGKILL.
STOP_TIMEOUT = 15


def describe_status(returncode):
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class Proc:
    """A background process whose output goes to a log file.

    Teardown (`stop_and_check`) fails the test when the process exited on its own without `may_exit=True` /
    `expect_exit()`, crashed, did not exit cleanly on the harness's SIGTERM (within the timeout, with a code in
    `clean_exits`), or printed a Swift trap ("Fatal error").
    """

    def __init__(self, args, log, env=None, may_exit=False, clean_exits=(0,), group=False):
        self.args = [str(a) for a in args]
        self.log = log
        self.may_exit = may_exit
        self.clean_exits = tuple(clean_exits)
        # Signal the whole process group (the process runs in a session of its own), not only the process: a relay
        # that forks (socat, sshd, nginx) takes its children with it.
        self.group = group
        self.stopped_with = None  # the signal the test or the harness stopped the process with
        self.killed_after_timeout = None  # the timeout after which the harness had to SIGKILL it
        self.log_start = pathlib.Path(log).stat().st_size if pathlib.Path(log).exists() else 0
        self.log_end = None
        self.handle = open(log, "ab")
        self.popen = subprocess.Popen(self.args, stdout=self.handle, stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True)

    def expect_exit(self):
        """Declares that the process may exit by itself (an error exit the test checks, for instance)."""
        self.may_exit = True
        return self

    def text(self):
        return pathlib.Path(self.log).read_text(errors="replace")

    def own_text(self):
        """The part of the log this process wrote (a restarted process appends to the same file)."""
        with open(self.log, "rb") as f:
            f.seek(self.log_start)
            data = f.read() if self.log_end is None else f.read(max(0, self.log_end - self.log_start))
        return data.decode(errors="replace")

    def expect_log(self, words, timeout=5):
        """Waits for `words` in the log: a process writes its log line after the effect a test observes."""
        wait_until(lambda: words in self.text(), timeout, f"the log line {words!r}")

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def send_signal(self, sig):
        """Sends `sig`; SIGTERM, SIGINT and SIGKILL count as the test stopping the process on purpose."""
        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL) and self.popen.poll() is None:
            self.stopped_with = sig
        if not self.group:
            self.popen.send_signal(sig)
        elif self.popen.poll() is None:  # not reaped yet, so its process group still exists
            os.killpg(self.popen.pid, sig)

    def _ended(self):
        if self.log_end is None:
            self.log_end = pathlib.Path(self.log).stat().st_size

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        if self.popen.poll() is None:
            self.send_signal(sig)
        return self.reap(timeout)

    def reap(self, timeout=STOP_TIMEOUT):
        """Waits up to `timeout` s for the (signalled) process to exit, SIGKILLs it after that, and closes its log."""
        if self.popen.poll() is None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.killed_after_timeout = timeout
                if self.group:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                else:
                    self.popen.kill()
                self.popen.wait()
        self._ended()
        self.handle.close()
        return self.popen.returncode

    def problem(self):
        """Why this (stopped) process fails the test, or None."""
        code = self.popen.returncode
        status = describe_status(code)
        reasons = []
        if self.killed_after_timeout is not None:
            reasons.append(f"did not exit within {self.killed_after_timeout}s of "
                           f"{signal.Signals(self.stopped_with).name} and was killed")
        elif self.stopped_with in (signal.SIGTERM, signal.SIGINT):
            if code not in self.clean_exits:
                reasons.append(f"stopped with {signal.Signals(self.stopped_with).name}, it ended with {status}")
        elif self.stopped_with is None and code is not None:
            if code < 0 and -code in CRASH_SIGNALS:
                reasons.append(f"crashed: {status}")
            elif not self.may_exit:
                reasons.append(f"exited on its own with {status}")
        text = self.own_text()
        words = [w for w in CRASH_WORDS if w in text]
        if words:
            reasons.append(f"its log contains {words[0]!r}")
        if not reasons:
            return None
        tail = "\n".join(text.splitlines()[-20:])
        return (f"{' '.join(self.args)}\n  ({status}; {'; '.join(reasons)})\n  last lines of {self.log}:\n"
                + "\n".join("    " + line for line in tail.splitlines()))


def stop_all(procs, timeout=STOP_TIMEOUT, together=False):
    """Stops every process (last started first) with SIGTERM, SIGKILL after `timeout` s; returns what failed while
    stopping them (messages). `together` sends every SIGTERM before it waits for the first exit."""
    errors = []

    def attempt(proc, action):
        try:
            action()
        except Exception as error:  # noqa: BLE001 - every process is stopped before anything is raised
            errors.append(f"{' '.join(proc.args)}: stopping it failed: {error!r}")

    if together:
        for proc in reversed(procs):
            if proc.alive():
                attempt(proc, lambda: proc.send_signal(signal.SIGTERM))
    for proc in reversed(procs):
        attempt(proc, lambda: proc.reap(timeout) if together else proc.stop(timeout=timeout))
    return errors


def stop_and_check(procs, timeout=STOP_TIMEOUT):
    """Stops every process (last started first), then fails if any of them ended badly (see `Proc`)."""
    check_exits(procs, stop_all(procs, timeout))


def check_exits(procs, errors=()):
    """Raises an AssertionError naming every process that ended badly; the processes must have been stopped."""
    problems = list(errors) + [p for p in (proc.problem() for proc in procs) if p]
    if problems:
        raise AssertionError("process(es) ended unexpectedly:\n" + "\n".join(problems))


class Processes:
    """Background processes (`Proc`) started by name, each logging to `<tmp>/<name>.log`; `close` stops them all,
    last started first, and fails if one of them ended badly (see `Proc`).

    The tests' labs (Cluster, support.kube.Lab, the namespace set-ups of support.topology, test_replicas and
    test_pools_netns) and the benchmark's (scripts/benchlib, scripts/shaped.py) share it.
    A subclass may change, as class attributes: `check` (False: stop without judging how the processes ended; a
    benchmark reports and does not fail on a relay's exit code), `group` (signal each process's whole process
    group: relays that fork), `together` (every SIGTERM sent before the first wait) and `stop_timeout` (seconds
    from SIGTERM to SIGKILL).
    """

    check = True
    group = False
    together = False
    stop_timeout = STOP_TIMEOUT

    def __init__(self, tmp):
        self.tmp = pathlib.Path(tmp)
        self.procs = []

    @property
    def named(self):
        """{name: the last process started under that name}."""
        return {proc.name: proc for proc in self.procs if getattr(proc, "name", None) is not None}

    def spawn(self, args, name, env=None, may_exit=False, clean_exits=(0,)):
        log = self.tmp / f"{name}.log"
        for earlier in self.procs:  # a restarted process appends to its predecessor's log
            if pathlib.Path(earlier.log) == log and not earlier.alive():
                earlier._ended()
        proc = Proc(args, log, env=env, may_exit=may_exit, clean_exits=clean_exits, group=self.group)
        proc.name = name
        self.procs.append(proc)
        return proc

    def close(self):
        """Stops every process; then, with `check`, fails if one of them ended badly (see `Proc`), and without it
        only if stopping one failed."""
        errors = stop_all(self.procs, self.stop_timeout, self.together)
        if self.check:
            check_exits(self.procs, errors)
        elif errors:
            raise RuntimeError("stopping process(es) failed:\n" + "\n".join(errors))


class Cluster(Processes):
    """A PKI, a server, agents and edge services on loopback, all stopped at teardown."""

    def __init__(self, tmp):
        super().__init__(tmp)
        self.pki = self.tmp / "pki"
        run(BIN / "edgetunnel", "pki", "init", "--pki-dir", self.pki)
        run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", self.pki, "--name", "operator")
        self.ca = self.pki / "ca.crt"
        self.cert = self.pki / "operator.crt"
        self.key = self.pki / "operator.key"
        self.ca_hash = run(BIN / "edgetunnel", "pki", "ca-hash", "--pki-dir", self.pki).stdout.strip()
        self.ports = {name: free_port() for name in ("tunnel", "secure", "meta", "insecure")}

    def token(self, ttl="1h", cidrs=("127.0.0.0/8", "10.0.0.0/8")):
        """A bootstrap token whose nodes may claim node IPs in `cidrs` (loopback and the namespace tests' nets)."""
        args = [a for cidr in cidrs for a in ("--node-cidr", cidr)]
        return run(BIN / "edgetunnel", "token", "create", "--pki-dir", self.pki, "--ttl", ttl, *args).stdout.strip()

    def start_server(self, *extra, wait=True):
        self.server = self.spawn([
            BIN / "edge-tunnel-server", "--pki-dir", self.pki, "--bind-address", "127.0.0.1",
            "--tunnel-port", self.ports["tunnel"], "--secure-port", self.ports["secure"],
            "--meta-port", self.ports["meta"], "--insecure-port", self.ports["insecure"], "--server-id", "test-server",
            *extra], "server")
        if wait:
            wait_until(lambda: http_get(self.meta_url("/readyz"))[0] == 200, 20, "server /readyz")
        return self.server

    def meta_url(self, path):
        return f"http://127.0.0.1:{self.ports['meta']}{path}"

    def agents(self):
        return json.loads(http_get(self.meta_url("/v1/agents"))[1])["agents"]

    def start_agent(self, name, *extra, ips=("127.0.0.1",), join=True, wait=True, pki=None):
        meta = free_port()
        args = [BIN / "edge-tunnel-agent", "--node-name", name, "--server-address",
                f"127.0.0.1:{self.ports['tunnel']}", "--pki-dir", pki or self.tmp / f"agent-{name}",
                "--meta-port", meta]
        for ip in ips:
            args += ["--node-ip", ip]
        if join:
            args += ["--bootstrap-token", self.token(), "--ca-cert-hash", self.ca_hash]
        agent = self.spawn(args + list(extra), f"agent-{name}")
        agent.meta = meta
        if wait:
            wait_until(lambda: http_get(f"http://127.0.0.1:{meta}/readyz")[0] == 200, 20, f"agent {name} ready")
        return agent

    def start_edge_service(self, port=None):
        port = port or free_port()
        service = self.spawn([sys.executable, HERE / "edge_service.py", "127.0.0.1", port], f"edge-{port}",
                             clean_exits=PYTHON_HELPER_EXITS)
        wait_until(lambda: socket.create_connection(("127.0.0.1", port), 1).close() is None, 10, "edge service")
        return port

    def curl(self, url, *extra, check=False, timeout=120):
        args = ["curl", "-sS", "--proxy-cacert", self.ca, "--proxy-cert", self.cert, "--proxy-key", self.key,
                "-p", "-x", f"https://127.0.0.1:{self.ports['secure']}", *extra, url]
        return run(*args, check=check)

    def tls_context(self, cert=None, key=None):
        context = ssl.create_default_context(cafile=str(self.ca))
        context.check_hostname = False
        if cert:
            context.load_cert_chain(str(cert), str(key))
        return context

    def connect_stream(self, target, cert=None, key=None, timeout=30, ragged_eof_is_error=False):
        """A CONNECT stream through the secure port; returns (status line, socket). With `ragged_eof_is_error` a
        connection that ends without TLS close_notify raises (ssl.SSLEOFError) instead of reading as a clean EOF."""
        raw = socket.create_connection(("127.0.0.1", self.ports["secure"]), timeout=timeout)
        tls = self.tls_context(cert or self.cert, key or self.key).wrap_socket(
            raw, suppress_ragged_eofs=not ragged_eof_is_error)
        tls.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return read_head(tls).split(b"\r\n", 1)[0].decode(), tls


# The raw-peer helpers live in support.peers; re-exported so that `from support.harness import read_frame` goes on working.
from support.peers import (  # noqa: E402,F401
    TCP_CLOSE, TCP_CLOSE_WAIT, FakeServer, connection_end, frame, metric_of, read_all, read_frame, read_head, recv_exact,
    rss_kib, tcp_state)
