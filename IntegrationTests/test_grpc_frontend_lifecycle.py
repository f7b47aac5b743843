"""The gRPC frontend (`--grpc-uds-path`, issue 28) when its clients die, wait or never read: kube-apiserver's egress
selector in GRPC mode, played by a real gRPC client (grpcio, stubs generated from Protos/konnectivity.proto at test
time; see konnectivity_client.py), against the real server, agent and edge service.

Each test proves one thing a kube-apiserver on GRPC depends on: a killed client and one that vanishes while the
server waits on it leave nothing behind; the caller limit counts gRPC dials; a dial times out, or is cancelled
while pending; the rendered egress configuration reaches the server; a client that never reads cannot grow the
server with requests. Dials, bytes, failures, malformed packets and DRAIN are in test_grpc_frontend.py.
"""
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import konnectivity_client as kc
from support.grpc_lab import server_metric, fetch
from support.grpc_lab import lab  # noqa: F401  (fixture)
from support.harness import BIN, Cluster, metric_of, rss_kib, wait_until

HERE = pathlib.Path(__file__).resolve().parent


def test_a_client_killed_mid_transfer_frees_every_connection(lab):
    """A client process with 8 downloads on 4 RPCs is killed (SIGKILL) in the middle: the server's streams, its
    gRPC gauges and its descriptors return to what they were before it came."""
    pid = lab.server.popen.pid
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    script = f"""
import sys; sys.path.insert(0, {str(HERE)!r})
import konnectivity_client as kc
channel = kc.channel({str(lab.grpc_sock)!r})
proxies = [kc.Proxy(channel) for _ in range(4)]
for proxy in proxies:
    for _ in range(2):
        proxy.connect("edge-1:{lab.edge_port}").send(kc.http_request("/infinite"))
print("ready", flush=True)
sys.stdin.read()
"""
    client = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        wait_until(lambda: server_metric(lab, "edge_tunnel_server_streams") == 8, 10, "8 streams")
        assert server_metric(lab, 'edge_tunnel_server_frontend_connections{frontend="grpc"}') == 8
        time.sleep(0.5)  # in the middle of the transfers
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait(10)
    wait_until(lambda: server_metric(lab, "edge_tunnel_server_streams") == 0, 10, "every stream ended")
    assert server_metric(lab, 'edge_tunnel_server_frontend_connections{frontend="grpc"}') == 0
    wait_until(lambda: server_metric(lab, 'edge_tunnel_server_frontend_rpcs{frontend="grpc"}') == 0, 10, "no RPC")
    wait_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= fds, 10, "the server's descriptors back to before")


def test_the_caller_limit_counts_grpc_dials(tmp_path):
    """--max-streams-per-caller bounds the gRPC socket's connections as it bounds a CONNECT caller's: the one over
    is refused with a one-line error naming the limit, and a close makes room again."""
    c = Cluster(tmp_path)
    try:
        sock = tmp_path / "konnectivity.sock"
        c.start_server("--grpc-uds-path", sock, "--max-streams-per-caller", "3")
        port = c.start_edge_service()
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}")
        with kc.channel(sock) as channel:
            proxy = kc.Proxy(channel)
            open_ = [proxy.connect(f"edge-1:{port}") for _ in range(3)]
            refused = proxy.dial(f"edge-1:{port}")
            assert refused.connectID == 0 and "has 3 streams open, its limit" in refused.error, refused
            open_[0].close()
            open_[0].close_response()
            wait_until(lambda: not proxy.dial(f"edge-1:{port}").error, 10, "room after a close")
    finally:
        c.close()


def test_a_dial_timeout_and_a_dial_cancelled_while_pending(tmp_path):
    """The target drops SYNs (its node's iptables), so a dial stays pending. DIAL_CLS cancels one: no DIAL_RSP ever
    comes for it, the server forgets the stream at once and the agent gives up its connection attempt, long before
    the dial timeout. Another dial, left alone, gets its DIAL_RSP error "dial timeout: ..." when the agent gives up (10 s)."""
    from netns import sh, two_hosts

    with two_hosts(prefix="10.231.11") as (cloud, cloud_ip, edge, edge_ip):
        c = Cluster(tmp_path)
        sock = tmp_path / "konnectivity.sock"
        try:
            sh("ip", "netns", "exec", edge, "iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "DROP")
            c.spawn(["ip", "netns", "exec", cloud, BIN / "edge-tunnel-server", "--pki-dir", c.pki, "--cert-ips",
                     cloud_ip, "--grpc-uds-path", sock], "server-ns")
            meta = f"http://{cloud_ip}:10265"

            def server(path):
                return sh("ip", "netns", "exec", cloud, "curl", "-s", f"{meta}{path}", check=False).stdout

            wait_until(lambda: server("/readyz") == "ok\n", 20, "server")
            c.spawn(["ip", "netns", "exec", edge, BIN / "edge-tunnel-agent", "--node-name", "edge-1", "--node-ip",
                     edge_ip, "--server-address", f"{cloud_ip}:10262", "--pki-dir", tmp_path / "agent",
                     "--bootstrap-token", c.token(), "--ca-cert-hash", c.ca_hash, "--allow", f"{edge_ip}:9"], "agent-ns")
            wait_until(lambda: "edge-1" in server("/v1/agents"), 20, "agent")

            def syn_sent():
                return sh("ip", "netns", "exec", edge, "ss", "-Htn", "state", "syn-sent").stdout.strip()

            with kc.channel(sock) as channel:
                proxy = kc.Proxy(channel)
                timed_out = kc.dial_request(f"{edge_ip}:9", random_number=1)
                cancelled = kc.dial_request(f"{edge_ip}:9", random_number=2)
                proxy.send(timed_out)
                proxy.send(cancelled)
                wait_until(lambda: syn_sent().count("\n") == 1, 10, "both dials pending at the agent")
                proxy.send(kc.pb.Packet(type=kc.pb.DIAL_CLS, closeDial=kc.pb.CloseDial(random=2)))
                wait_until(lambda: syn_sent().count("\n") == 0 and syn_sent(), 10, "one connection attempt left")
                assert metric_of(server("/metrics"), "edge_tunnel_server_streams") == 1
                response = proxy.dial_response(1, timeout=30)
                assert response.connectID == 0 and response.error.startswith("dial timeout:"), response
                assert 2 not in proxy.dial_responses, "a cancelled dial was answered"
                wait_until(lambda: not syn_sent(), 10, "no connection attempt left")
                assert metric_of(server("/metrics"), "edge_tunnel_server_streams") == 0
                assert metric_of(server("/metrics"),
                                 'edge_tunnel_server_frontend_dials_total{frontend="grpc",result="cancelled"}') == 1
        finally:
            c.close()


def test_the_rendered_egress_configuration_reaches_the_server(tmp_path, edgetunnel):
    """`edgetunnel manifests --egress grpc --egress-uds PATH` renders kube-apiserver's EgressSelectorConfiguration;
    a server started with --grpc-uds-path at the udsName it names is reached through it, as kube-apiserver would."""
    import yaml
    sock = tmp_path / "edge-tunnel.socket"
    rendered = yaml.safe_load(edgetunnel("manifests", "--egress", "grpc", "--egress-uds", sock).stdout)
    assert rendered["kind"] == "EgressSelectorConfiguration" and rendered["apiVersion"] == "apiserver.k8s.io/v1beta1"
    selection = rendered["egressSelections"][0]
    assert selection["name"] == "cluster" and selection["connection"]["proxyProtocol"] == "GRPC"
    uds = selection["connection"]["transport"]["uds"]["udsName"]
    c = Cluster(tmp_path)
    try:
        c.start_server("--grpc-uds-path", uds)
        port = c.start_edge_service()
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}")
        with kc.channel(uds) as channel:
            head, body = fetch(kc.Proxy(channel).connect(f"edge-1:{port}"), "/hello")
            assert body == b"hello from the edge\n"
    finally:
        c.close()


def test_a_client_that_never_reads_cannot_grow_the_server_with_requests(lab):
    """A client sends 100,000 CLOSE_REQs for connectIDs that do not exist and reads none of the answers: after 64
    queued answers the server stops reading that RPC (HTTP/2 flow control holds the client), so it grows by little,
    and another client is served meanwhile. Garbage instead of HTTP/2 on the socket is closed."""
    import socket
    pid = lab.server.popen.pid
    base = rss_kib(pid)
    with kc.channel(lab.grpc_sock) as channel:
        flood = kc.Proxy(channel, read=False)
        sender = threading.Thread(target=lambda: [flood.send(kc.pb.Packet(
            type=kc.pb.CLOSE_REQ, closeRequest=kc.pb.CloseRequest(connectID=n))) for n in range(1, 100_001)],
            daemon=True)
        sender.start()
        time.sleep(3)
        with kc.channel(lab.grpc_sock) as other_channel:
            head, body = fetch(kc.Proxy(other_channel).connect(f"edge-1:{lab.edge_port}"), "/hello")
            assert body == b"hello from the edge\n"
        grown = rss_kib(pid) - base
        assert grown < 32 * 1024, f"the server grew by {grown} KiB"
        flood.start_reading()  # once read, every answer comes: nothing was dropped
        flood.wait_for(lambda: True if len(flood.closes) == 100_000 else None, 120, "100,000 CLOSE_RSPs")
        assert all("is not open" in r.error for r in list(flood.closes.values())[:100])
        flood.cancel()
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(10)
    raw.connect(str(lab.grpc_sock))
    raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
    try:
        while raw.recv(65536):
            pass
    except ConnectionResetError:
        pass
    raw.close()


def test_a_client_that_vanishes_while_the_server_waits_on_it_frees_everything(tmp_path):
    """The server's reader of an RPC waits in two places: for a stream the tunnel paused (its target does not
    read) and for room to answer (the client does not read). A client killed while the server waits in either
    (one RPC each, in one process) must still free its RPCs, streams and caller slots: grpc-swift reports that
    through the RPC's cancellation handler, not by cancelling the handler's task."""
    import socket
    c = Cluster(tmp_path)
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(16)  # accepts (the kernel does) and never reads
    sink_port = sink.getsockname()[1]
    sock = tmp_path / "konnectivity.sock"
    try:
        c.start_server("--grpc-uds-path", sock)
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{sink_port}")
        script = f"""
import sys, time; sys.path.insert(0, {str(HERE)!r})
import konnectivity_client as kc
channel = kc.channel({str(sock)!r})
stuck = kc.Proxy(channel)
connection = stuck.connect("edge-1:{sink_port}")
connection.send(b"x" * (24 * 1024 * 1024))  # far past the window and every kernel buffer: the stream pauses
deaf = kc.Proxy(channel, read=False)
for n in range(1, 2001):
    deaf.send(kc.pb.Packet(type=kc.pb.CLOSE_REQ, closeRequest=kc.pb.CloseRequest(connectID=n)))
time.sleep(3)
print("ready", flush=True)
sys.stdin.read()
"""
        client = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert client.stdout.readline().strip() == "ready"
            assert server_metric(c, 'edge_tunnel_server_frontend_rpcs{frontend="grpc"}') == 2
            assert server_metric(c, "edge_tunnel_server_streams") == 1
        finally:
            client.send_signal(signal.SIGKILL)
            client.wait(10)
        wait_until(lambda: server_metric(c, 'edge_tunnel_server_frontend_rpcs{frontend="grpc"}') == 0, 15, "no RPC")
        wait_until(lambda: server_metric(c, "edge_tunnel_server_streams") == 0, 15, "no stream")
        assert server_metric(c, 'edge_tunnel_server_frontend_connections{frontend="grpc"}') == 0
    finally:
        sink.close()
        c.close()
