"""Resumable tunnels (issue 16 B) on the Express Connect topology: open streams survive the private line's loss and
an outage of the only path, byte-exact, and fail loudly when the server restarted meanwhile."""
import json
import os
import socket
import ssl
import threading
import time

import pytest

from conftest import BIN, run
from netns import Topology
from support.harness import Cluster, FakeServer, connection_end, frame, http_get, read_frame, rss_kib, wait_until
from support.topology import LINES, LOOPS, SIZE, Transfers
from support.topology import Setup as ExpressSetup

PRIVATE, PUBLIC = Topology.PRIVATE, Topology.PUBLIC


class Setup(ExpressSetup):
    """Express Connect's setup, its server on `LOOPS`."""

    def spawn(self, ns, args, name, *rest, **options):
        if name == "server":
            args = [*args, *LOOPS]
        return super().spawn(ns, args, name, *rest, **options)


@pytest.fixture
def topo():
    with Topology() as t:
        yield t


def drop_private_line(topo, on):
    action = "-I" if on else "-D"
    dev = topo.private_link
    topo.run(topo.edge, "iptables", "-w", action, "INPUT", "-i", dev, "-j", "DROP")
    topo.run(topo.edge, "iptables", "-w", action, "OUTPUT", "-o", dev, "-j", "DROP")


def internet_outage(topo, on):
    topo.run(topo.inet, "iptables", "-w", "-I" if on else "-D", "FORWARD", "-j", "DROP")


@pytest.mark.parametrize("cut", ["drop", "link-down"])
def test_streams_survive_the_private_lines_loss(topo, tmp_path, cut):
    """The private line goes (iptables DROP, or its link down) while a follow stream, a download and an upload
    run over it; the agent fails over to the internet path and all three end byte-exact."""
    s = Setup(topo, tmp_path)
    try:
        s.start_server([PUBLIC, PRIVATE])
        s.start_agent([f"{PRIVATE}:10262", f"{PUBLIC}:10262"])
        wait_until(lambda: s.path_in_use() == f"{PRIVATE}:10262", 30, "the agent on the private line")
        t = Transfers(s, tmp_path)
        t.start()
        if cut == "drop":
            drop_private_line(topo, True)
        else:
            topo.cut_private_line()
        wait_until(lambda: s.path_in_use() == f"{PUBLIC}:10262", 40, "the agent on the internet path")
        assert all(t.running()), "every transfer pauses across the switch, none ends"
        results = t.finish()
        t.assert_complete(results)
        s.server.expect_log("resumed the agent's 3 streams on its new connection")
        print(f"resume after the private line's loss ({cut}): longest pause of the follow stream "
              f"{t.longest_pause():.1f} s")
        # Issue 26: while data moves the agent finds the lost line within 1.5 s and resumes on the internet path;
        # the pause was 9.1-9.3 s with the idle keepalive alone.
        assert t.longest_pause() <= 2.0, f"the follow stream paused {t.longest_pause():.1f} s across the failover"
    finally:
        s.close()


def metric_of(text, name):
    """The value of a metric (the first line that starts with `name`), None when the text has no such line."""
    lines = [line for line in text.splitlines() if line.startswith(name)]
    return float(lines[0].split()[-1]) if lines else None


def agent_metric(s, name):
    return metric_of(s.agent_meta("/metrics"), name)


def transfers_running(s, tmp_path):
    """The internet path only, and the three transfers running on it."""
    s.start_server([PUBLIC])
    s.start_agent([f"{PUBLIC}:10262"])
    wait_until(lambda: s.path_in_use() == f"{PUBLIC}:10262", 30, "the agent on the internet path")
    t = Transfers(s, tmp_path)
    t.start()
    return t


def outage_until_detected(s):
    """The path goes; returns once the agent has found the tunnel lost and its streams wait to resume, with the
    seconds that took (while data moves: 1.5 s, issue 26)."""
    internet_outage(s.topo, True)
    started = time.monotonic()
    wait_until(lambda: agent_metric(s, "edge_tunnel_agent_suspended_tunnels") == 1, 15,
               "the agent's streams waiting to resume")
    detected_after = time.monotonic() - started
    s.agent.expect_log("wait to resume")
    return detected_after


def transfers_into_an_outage(s, tmp_path):
    """The three transfers start, then the path goes, until the agent's streams wait."""
    t = transfers_running(s, tmp_path)
    outage_until_detected(s)
    return t


class RSSSampler:
    """Samples the RSS of some processes every 0.2 s on a thread, with the moment of each sample."""

    def __init__(self, pids):
        self.pids, self.samples, self.stop = pids, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), {name: rss_kib(pid) for name, pid in self.pids.items()}))
            self.stop.wait(0.2)

    def peak(self, name, since, until):
        values = [kib[name] for at, kib in self.samples if since <= at <= until]
        assert len(values) >= 5, f"only {len(values)} RSS samples of the {name} in that interval"
        return max(values)

    def finish(self):
        self.stop.set()
        self.thread.join(5)


# The outage: the path stays down this long after the agent found the tunnel lost (the detection time varies: 1.5 s
# while data moves, 9 s on an idle tunnel; the outage is measured from it, so that the streams wait this long).
OUTAGE_AFTER_DETECTION = 12
# Warm-up before the baseline: the transfers have filled their windows and the buffers on the way by then.
WARMUP_S = 3
# How much the server's and the agent's RSS may grow over the baseline while the streams wait: each holds what its
# three streams' windows and the bytes kept to send again allow, never what the callers and the edge service keep
# pushing (the upload alone pushes 8 MB/s: ~100 MiB over the outage if it were read into memory). Measured with a
# debug build: +0.5 MiB for the server, none for the agent (the test prints it).
OUTAGE_GROWTH_BOUND_MIB = 16


def test_streams_survive_a_12_second_outage_of_the_only_path_with_bounded_memory(topo, tmp_path):
    s = Setup(topo, tmp_path)
    try:
        t = transfers_running(s, tmp_path)
        sampler = RSSSampler({"server": s.server.popen.pid, "agent": s.agent.popen.pid})
        try:
            warm_from = time.monotonic()
            time.sleep(WARMUP_S)  # the transfers run: the baseline is taken with their windows and buffers full
            base_from = time.monotonic()
            time.sleep(1)
            outage_from = time.monotonic()
            base = {name: sampler.peak(name, base_from, outage_from) for name in sampler.pids}
            try:
                detected_after = outage_until_detected(s)
                assert all(t.running()), "every transfer waits across the outage, none ends"
                time.sleep(OUTAGE_AFTER_DETECTION)  # the outage itself: its length is the scenario
                assert all(t.running()), "every transfer waits across the outage, none ends"
            finally:
                internet_outage(topo, False)
            outage_to = time.monotonic()
        finally:
            sampler.finish()
        peaks = {name: sampler.peak(name, outage_from, outage_to) for name in sampler.pids}
        growth = {name: (peaks[name] - base[name]) / 1024 for name in base}
        print(f"RSS baseline after {base_from - warm_from:.0f} s of transfers {base} KiB, peak during the outage "
              f"{peaks} KiB: growth {', '.join(f'{n} {g:.1f} MiB' for n, g in growth.items())}; "
              f"loss found after {detected_after:.1f} s, outage {outage_to - outage_from:.1f} s")
        for name, mib in growth.items():
            assert mib < OUTAGE_GROWTH_BOUND_MIB, f"{name} RSS grew by {mib:.1f} MiB while its streams waited to resume"
        results = t.finish()
        t.assert_complete(results)
        s.server.expect_log("resumed the agent's 3 streams on its new connection")
        assert agent_metric(s, 'edge_tunnel_agent_tunnel_resumes_total{outcome="resumed"}') == 1
        assert agent_metric(s, "edge_tunnel_agent_suspended_tunnels") == 0
        # The follow stream waited the whole outage after the loss was found, then went on.
        assert t.longest_pause() >= OUTAGE_AFTER_DETECTION, t.longest_pause()
        # Every byte kept to send again is given back once the streams have ended (and stopped lingering).
        wait_until(lambda: metric_of(s.meta("/metrics"), "edge_tunnel_server_retained_bytes") == 0, 10,
                   "the server keeping nothing more")
        print(f"resume after a {outage_to - outage_from:.1f} s outage: longest pause {t.longest_pause():.1f} s")
    finally:
        s.close()


def edge_events(s):
    """The edge service's lines about transfers that ended early (edge_service.event)."""
    return [line for line in (s.tmp / "edge-service.log").read_text().splitlines() if line.startswith("EDGE ")]


def test_a_server_restart_during_the_outage_makes_the_streams_fail_loudly(topo, tmp_path):
    """The server restarts while the agent's streams wait: the new server cannot resume them. Every stream ends with
    a reset on both sides, never with a clean end that a short transfer could pass for complete: each caller (curl,
    over TLS to the server) sees its connection reset, and the edge service sees the agent reset each of its three
    connections (its upload's body cut by ECONNRESET, not ended by EOF)."""
    s = Setup(topo, tmp_path)
    try:
        t = transfers_into_an_outage(s, tmp_path)
        try:
            s.server.stop()
            s.start_server([PUBLIC])
        finally:
            internet_outage(topo, False)
        results = t.finish()
        print({name: (code, err) for name, (code, _, err) in results.items()})
        for name, (code, _, err) in results.items():
            assert code != 0, f"{name} must fail, not end as if complete"
            # curl names the reset of its TLS connection to the server (exit 56 or 55); a clean close would be
            # "transfer closed with N bytes remaining" (18), a close without close_notify "unexpected eof".
            assert code in (55, 56) and "reset by peer" in err, f"{name}: curl exited {code}: {err}"
        assert os.path.getsize(t.download_file) < SIZE
        s.agent.expect_log("could not resume the lost tunnel's streams", timeout=30)
        wait_until(lambda: agent_metric(s, 'edge_tunnel_agent_tunnel_resumes_total{outcome="ended"}') == 1, 5,
                   "the agent counting the streams it could not resume")
        # 30 s: how they end is the point, not how fast; CI's three workers once took longer than 10 s.
        try:
            wait_until(lambda: len(edge_events(s)) == 3, 30, "the edge service's three transfers to end")
        except AssertionError as timeout:
            raise AssertionError(f"{timeout}; the edge service logged: {edge_events(s)}") from None
        events = edge_events(s)
        print(events)
        upload = [e for e in events if e.startswith("EDGE POST /sha256:")]
        assert len(upload) == 1 and upload[0].endswith(": ConnectionResetError"), events
        for path in (f"/blob/{SIZE}", f"/follow/{LINES}"):
            sent = [e for e in events if e.startswith(f"EDGE GET {path}: sending ended")]
            assert len(sent) == 1 and sent[0].endswith((": ConnectionResetError", ": BrokenPipeError")), events
        wait_until(lambda: s.request().stdout == "hello from the edge\n", 30, "the agent serving again")
    finally:
        s.close()


def raw_hello(c, cert, key, node, version=3, tokens=None):
    """A raw agent connection: HELLO (with `tokens`), then the HELLO_OK's JSON and the TLS socket."""
    raw = socket.create_connection(("127.0.0.1", c.ports["tunnel"]), timeout=10)
    tls = c.tls_context(cert, key).wrap_socket(raw)
    body = {"version": version, "nodeName": node, "nodeIPs": [], "capabilities": []}
    if tokens is not None:
        body["resumeTokens"] = tokens
    tls.sendall(frame(1, 0, json.dumps(body).encode()))
    frame_type, _, payload = read_frame(tls)
    assert frame_type == 2, f"{node}: {payload!r}"
    return json.loads(payload), tls


def test_resume_tokens_are_bound_to_their_node_and_version_2_agents_are_served_as_before(tmp_path):
    """Raw agents with real certificates: a version-2 agent registers and gets no token; a version-3 agent gets
    one, and its lost tunnel's stream waits. Another node naming that token resumes nothing; the node itself
    coming back with a wrong token (a restarted agent) ends the waiting stream at once, loudly; with the right
    token the server's RESUME lists the stream."""
    c = Cluster(tmp_path)
    try:
        c.start_server(*LOOPS)
        issued = tmp_path / "issued"
        for name in ("edge-1", "edge-5"):
            run(BIN / "edgetunnel", "pki", "issue-client", "--pki-dir", c.pki, "--name", name,
                "--org", "edge-tunnel:agents", "--out-dir", issued)
        edge1, edge5 = (issued / "edge-1.crt", issued / "edge-1.key"), (issued / "edge-5.crt", issued / "edge-5.key")

        ok, old_agent = raw_hello(c, *edge5, "edge-5", version=2)
        assert "resumeToken" not in ok or ok["resumeToken"] is None
        old_agent.close()

        def lose_a_tunnel_with_a_stream():
            ok, tls = raw_hello(c, *edge1, "edge-1")
            token = ok["resumeToken"]
            assert len(token) == 32 and ok["resumeGraceSeconds"] == 30
            result = {}
            caller = threading.Thread(target=lambda: result.update(
                status=c.connect_stream("edge-1:10250", c.cert, c.key, timeout=10, ragged_eof_is_error=True)))
            caller.start()
            while True:  # the OPEN, answered
                frame_type, stream_id, _ = read_frame(tls)
                if frame_type == 3:
                    tls.sendall(frame(4, stream_id, (1 << 20).to_bytes(4, "big")) + frame(6, stream_id, b"12345"))
                    break
            caller.join(10)
            status, sock = result["status"]
            assert status == "HTTP/1.1 200 Connection established"
            assert sock.recv(5) == b"12345"
            tls.close()  # the connection is lost with the stream open
            c.server.expect_log("agent connection lost: its 1 streams wait 30s", timeout=10)
            return token, stream_id, sock

        def metric(name):
            lines = [l for l in http_get(c.meta_url("/metrics"))[1].splitlines() if l.startswith(name)]
            return float(lines[0].split()[-1]) if lines else 0.0

        token, _, sock = lose_a_tunnel_with_a_stream()
        assert metric("edge_tunnel_server_suspended_tunnels") == 1
        stolen, thief = raw_hello(c, *edge5, "edge-5", tokens=[token])
        assert not stolen.get("resumed"), "another node's certificate resumed edge-1's streams"
        thief.close()
        sock.settimeout(1)
        with pytest.raises(socket.timeout):
            sock.recv(1)  # still waiting: the caller sees a pause

        restarted, again = raw_hello(c, *edge1, "edge-1", tokens=["0" * 32])
        assert not restarted.get("resumed")
        # Loudly: a TCP reset. A clean end (TLS close_notify) or a FIN without close_notify could pass for a complete
        # transfer to a client that does not frame its data (curl takes the latter as "transfer closed").
        assert connection_end(sock) == "reset"
        again.close()
        wait_until(lambda: metric('edge_tunnel_server_tunnel_resumes_total{outcome="ended"}') == 1, 5,
                   "the ended tunnel counted")
        assert metric("edge_tunnel_server_suspended_tunnels") == 0

        token, stream_id, sock = lose_a_tunnel_with_a_stream()
        resumed, tls = raw_hello(c, *edge1, "edge-1", tokens=["f" * 32, token])
        assert resumed["resumed"] is True
        frame_type, _, payload = read_frame(tls)
        assert frame_type == 19, frame_type
        assert [entry["id"] for entry in json.loads(payload)["streams"]] == [stream_id]
        wait_until(lambda: metric('edge_tunnel_server_tunnel_resumes_total{outcome="resumed"}') == 1, 5,
                   "the resume counted")
        tls.close()
        sock.close()
    finally:
        c.close()


def test_an_agent_falls_back_to_version_2_for_a_server_of_that_version(tmp_path):
    """A server of the previous version (a rollout or a rollback) refuses version 3 with the reason it has always
    given; the agent says HELLO again as version 2, without resume tokens, and is served."""
    c = Cluster(tmp_path)
    try:
        fake = FakeServer.replacing(c, "edge-1")
        agent = c.start_agent("edge-1", join=False, wait=False, pki=tmp_path / "agent-edge-1")
        tls, hello = fake.hello()
        with tls:
            assert hello["version"] == 3
            reason = "protocol version 3 is not supported (server speaks 2)"  # the version-2 server's words
            tls.sendall(frame(15, 0, json.dumps({"reason": reason}).encode()))
        agent.expect_log("using version 2, without resumable tunnels", timeout=10)
        tls, hello = fake.hello()
        with tls:
            assert hello["version"] == 2 and "resumeTokens" not in hello, hello
        fake.close()
    finally:
        c.close()


def test_a_refusal_that_only_quotes_the_version_sentence_does_not_make_the_agent_fall_back(tmp_path):
    """Reasons quote what Node objects and peers chose (addresses, names): a refusal whose text merely contains the
    version-2 server's sentence is not a version refusal. The agent stays on version 3 (issue 25)."""
    c = Cluster(tmp_path)
    try:
        fake = FakeServer.replacing(c, "edge-1")
        agent = c.start_agent("edge-1", join=False, wait=False, pki=tmp_path / "agent-edge-1")
        tls, hello = fake.hello()
        with tls:
            assert hello["version"] == 3
            reason = 'node IP "protocol version 3 is not supported (server speaks 2)" is not claimed'
            tls.sendall(frame(15, 0, json.dumps({"reason": reason}).encode()))
        tls, hello = fake.hello()
        with tls:
            assert hello["version"] == 3, hello
        assert "using version 2" not in agent.own_text()
        fake.close()
    finally:
        c.close()


def test_a_second_hello_ok_closes_the_agents_tunnel(tmp_path):
    """A server answers HELLO once. A hostile replica that sends a second HELLO_OK, naming another server and
    claiming to resume its streams, has its tunnel closed by the agent (issue 25)."""
    c = Cluster(tmp_path)
    try:
        fake = FakeServer.replacing(c, "edge-1")
        agent = c.start_agent("edge-1", join=False, wait=False, pki=tmp_path / "agent-edge-1")
        with fake.accept("replica-a") as tls:
            again = {"serverID": "replica-b", "maxFramePayload": 262144, "resumed": True, "resumeToken": "x" * 32,
                     "resumeGraceSeconds": 30}
            tls.sendall(frame(2, 0, json.dumps(again).encode()))
            agent.expect_log("sent a second HELLO_OK", timeout=10)
            deadline = time.monotonic() + 10
            closed = False
            while time.monotonic() < deadline:
                try:
                    frame_type, _, payload = read_frame(tls)
                except (ConnectionError, OSError, ssl.SSLError):
                    closed = True
                    break
                if frame_type == 10:
                    tls.sendall(frame(11, 0, payload))
            assert closed, "the agent kept a tunnel whose server said HELLO_OK twice"
        fake.close()
    finally:
        c.close()
