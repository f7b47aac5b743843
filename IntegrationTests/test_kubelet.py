"""Kubelet traffic through the tunnel: Host-routed HTTPS on the secure port, plain HTTP on the insecure port,
streaming logs and WebSocket exec, and the errors callers see."""
import base64
import os
import pathlib
import signal
import socket
import ssl
import struct
import sys
import subprocess
import time

import pytest

from conftest import BIN, run
from support import harness
from support.harness import PYTHON_HELPER_EXITS, Cluster, free_port, wait_until
from support.kubelet import start_kubelet_standin

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture
def kube(tmp_path):
    """Server (verifying kubelets against their CA), agent edge-1, and a kubelet stand-in on 127.0.0.1."""
    c = Cluster(tmp_path)
    try:
        c.start_server("--kubelet-ca-file", start_kubelet_standin(c, tmp_path, "edge-1"))
        c.agent = c.start_agent("edge-1", "--allow", f"127.0.0.1:{c.https_port}", "--allow", f"127.0.0.1:{c.http_port}")
        yield c
    finally:
        c.close()


def secure_socket(c, cert=None, key=None):
    raw = socket.create_connection(("127.0.0.1", c.ports["secure"]), timeout=20)
    return c.tls_context(cert or c.cert, key or c.key).wrap_socket(raw)


def read_head(sock):
    return harness.read_head(sock).decode(errors="replace")


def start_exec(sock, port):
    """Asks the kubelet on `port` of edge-1 for an exec session over WebSocket; returns the response head."""
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /exec/default/web/app?command=sh&stdin=true HTTP/1.1\r\nHost: edge-1:{port}\r\n"
                  f"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n").encode())
    return read_head(sock)


def test_https_request_is_routed_by_host_to_the_kubelet(kube):
    for host in [f"edge-1:{kube.https_port}", f"127.0.0.1:{kube.https_port}"]:
        result = run("curl", "-sS", "--cacert", kube.ca, "--cert", kube.cert, "--key", kube.key, "-H", f"Host: {host}",
                     f"https://127.0.0.1:{kube.ports['secure']}/healthz")
        assert result.stdout == "kubelet ok\n"
    # The kubelet saw the server's proxy-client certificate: issued from the tunnel CA.
    assert (kube.pki / "kubelet-client.crt").exists()


def test_plain_http_on_the_insecure_port(kube):
    result = run("curl", "-sS", "-H", f"Host: edge-1:{kube.http_port}",
                 f"http://127.0.0.1:{kube.ports['insecure']}/metrics")
    assert "kubelet_running_pods 3" in result.stdout


def test_follow_logs_arrive_line_by_line_and_closing_ends_the_kubelet_side(kube):
    sock = secure_socket(kube)
    sock.sendall(f"GET /containerLogs/default/web/app?follow=true HTTP/1.1\r\nHost: edge-1:{kube.https_port}\r\n\r\n".encode())
    head = read_head(sock)
    assert head.startswith("HTTP/1.1 200") and "chunked" in head.lower()
    data = b""
    delays = []
    while len(delays) < 5:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"the stream closed after {len(delays)} lines")
        data += chunk
        while b"\n" in data.split(b"\r\n", 1)[-1] if b"\r\n" in data else False:
            size_line, rest = data.split(b"\r\n", 1)
            size = int(size_line, 16)
            if len(rest) < size + 2:
                break
            line, data = rest[:size], rest[size + 2:]
            delays.append(time.time() - float(line.split()[0]))
    assert max(delays) < 1.0, f"lines arrived {max(delays):.2f}s after the kubelet wrote them"
    closed_at = time.time()
    sock.close()
    wait_until(lambda: "closed" in kube.events.read_text(), 5, "the kubelet side to close")
    ended = float(kube.events.read_text().split()[1])
    assert ended - closed_at < 2.0


def ws_frame(payload, opcode=2):
    mask = os.urandom(4)
    header = bytes([0x80 | opcode])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    else:
        header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ws_read(sock):
    def exact(n):
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out
    head = exact(2)
    length = head[1] & 0x7F
    if length == 126:
        length = struct.unpack(">H", exact(2))[0]
    return exact(length)


@pytest.mark.parametrize("port_kind", ["secure", "insecure"])
def test_websocket_exec_passes_101_and_1000_round_trips_are_byte_exact(kube, port_kind):
    if port_kind == "secure":
        sock, port = secure_socket(kube), kube.https_port
    else:
        sock, port = socket.create_connection(("127.0.0.1", kube.ports["insecure"]), timeout=20), kube.http_port
    head = start_exec(sock, port)
    assert head.startswith("HTTP/1.1 101") and "v4.channel.k8s.io" in head
    for i in range(1000):
        payload = b"\x00" + os.urandom(1 + i % 200)  # channel 0 (stdin) and data
        sock.sendall(ws_frame(payload))
        assert ws_read(sock) == payload, f"round trip {i} differs"
    sock.close()


@pytest.mark.parametrize("port_kind", ["secure", "insecure"])
def test_an_exec_session_cut_by_a_dead_tunnel_ends_with_an_error(kube, port_kind):
    """An upgraded exec session is read until it closes: when the tunnel dies under it, the session waits for
    the agent to resume it; when the agent comes back restarted, unable to, the caller must see a failure (a
    reset; on 10263 also no TLS close_notify: the kubelet's TLS runs in the stream and the server relays it),
    never the clean end a finished session has."""
    if port_kind == "secure":
        raw = socket.create_connection(("127.0.0.1", kube.ports["secure"]), timeout=20)
        sock = kube.tls_context(kube.cert, kube.key).wrap_socket(raw, suppress_ragged_eofs=False)
        port = kube.https_port
    else:
        sock, port = socket.create_connection(("127.0.0.1", kube.ports["insecure"]), timeout=20), kube.http_port
    assert start_exec(sock, port).startswith("HTTP/1.1 101")
    sock.sendall(ws_frame(b"\x00ls\n"))
    assert ws_read(sock) == b"\x00ls\n"
    kube.agent.send_signal(signal.SIGKILL)
    kube.agent.popen.wait(10)
    sock.settimeout(2)
    with pytest.raises(socket.timeout):
        sock.recv(65536)  # a pause: the session waits for the agent
    kube.start_agent("edge-1", "--allow", f"127.0.0.1:{kube.https_port}", "--allow", f"127.0.0.1:{kube.http_port}",
                     join=False, pki=kube.tmp / "agent-edge-1")
    sock.settimeout(10)
    try:
        ended = "eof" if sock.recv(65536) == b"" else "data"
    except (ConnectionResetError, ssl.SSLError):
        ended = "error"
    sock.close()
    assert ended == "error"


def raw_request(kube, request, port_kind="insecure", timeout=20):
    if port_kind == "secure":
        sock = secure_socket(kube)
    else:
        sock = socket.create_connection(("127.0.0.1", kube.ports["insecure"]), timeout=timeout)
    sock.settimeout(timeout)
    sock.sendall(request)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    sock.close()
    return data.decode(errors="replace")


def test_errors_say_what_happened(kube):
    no_host = raw_request(kube, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert no_host.startswith("HTTP/1.1 400") and "no Host header" in no_host
    unknown = raw_request(kube, b"GET /metrics HTTP/1.1\r\nHost: ghost-node:10255\r\n\r\n")
    assert unknown.startswith("HTTP/1.1 502") and "no agent for node ghost-node" in unknown
    bad_host = raw_request(kube, b"GET /metrics HTTP/1.1\r\nHost: not a host\r\n\r\n")
    assert bad_host.startswith("HTTP/1.1 400")
    not_utf8 = raw_request(kube, b"GET /metrics HTTP/1.1\r\nHost: edge-1:10255\r\nX-Name: \xff\xfe\r\n\r\n")
    assert not_utf8.startswith("HTTP/1.1 400") and "request head is not valid UTF-8" in not_utf8
    truncated = raw_request(kube, b"GET /metrics HTTP/1.1\r\nHost: edge-1:10255\r\nX-Name: \xc3\r\n\r\n")
    assert truncated.startswith("HTTP/1.1 400") and "not valid UTF-8" in truncated
    huge = raw_request(kube, b"GET / HTTP/1.1\r\nHost: edge-1:1\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
    assert huge.startswith("HTTP/1.1 431")
    smuggle = raw_request(kube, f"POST / HTTP/1.1\r\nHost: edge-1:{kube.http_port}\r\nContent-Length: 4\r\n"
                                f"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode())
    assert smuggle.startswith("HTTP/1.1 400") and "smuggling" in smuggle
    closed = free_port()
    refused = raw_request(kube, f"GET / HTTP/1.1\r\nHost: edge-1:{kube.https_port + 0}\r\n\r\n".encode().replace(
        str(kube.https_port).encode(), str(closed).encode()))
    assert refused.startswith("HTTP/1.1 403")  # not on the allow list
    policy = raw_request(kube, b"GET / HTTP/1.1\r\nHost: edge-1:22\r\n\r\n", port_kind="secure")
    assert policy.startswith("HTTP/1.1 403") and "refused by agent policy" in policy


def test_a_kubelet_certificate_for_another_name_is_refused(tmp_path):
    """The kubelet's certificate is signed by the right CA but names another node: asked for by node name, the
    server refuses it with 502 naming both; asked for by an IP the certificate does carry, it is served."""
    c = Cluster(tmp_path)
    try:
        c.start_server("--kubelet-ca-file", start_kubelet_standin(c, tmp_path, "edge-2"))
        https = c.https_port
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{https}")
        wrong = raw_request(c, f"GET /healthz HTTP/1.1\r\nHost: edge-1:{https}\r\n\r\n".encode(), port_kind="secure")
        assert wrong.startswith("HTTP/1.1 502"), wrong
        assert "TLS to the kubelet of node edge-1" in wrong and "names edge-2" in wrong and "not edge-1" in wrong
        by_ip = raw_request(c, f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{https}\r\nConnection: close\r\n\r\n".encode(),
                            port_kind="secure")
        assert by_ip.startswith("HTTP/1.1 200") and by_ip.endswith("kubelet ok\n"), by_ip
    finally:
        c.close()


def test_kubelet_refusing_or_failing_tls_is_a_502_naming_it(tmp_path):
    c = Cluster(tmp_path)
    try:
        other = tmp_path / "wrong-ca"
        run(BIN / "edgetunnel", "pki", "init", "--pki-dir", other)
        c.start_server("--kubelet-ca-file", other / "ca.crt")
        closed, plain = free_port(), free_port()
        service = c.start_edge_service(plain)
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{closed}", "--allow", f"127.0.0.1:{plain}")
        down = raw_request(c, f"GET / HTTP/1.1\r\nHost: edge-1:{closed}\r\n\r\n".encode(), port_kind="secure")
        assert down.startswith("HTTP/1.1 502") and "refused the connection" in down and "edge-1" in down
        # A plain HTTP service where the kubelet's TLS is expected: the TLS to it fails, named.
        not_tls = raw_request(c, f"GET / HTTP/1.1\r\nHost: edge-1:{plain}\r\n\r\n".encode(), port_kind="secure")
        assert not_tls.startswith("HTTP/1.1 502") and "TLS to the kubelet of node edge-1" in not_tls
    finally:
        c.close()


def test_a_slow_client_times_out_and_others_are_unaffected(kube):
    slow = socket.create_connection(("127.0.0.1", kube.ports["insecure"]), timeout=30)
    started = time.monotonic()
    answer = b""
    for byte in b"GET /metrics HTTP/1.1\r\nHost: edge-1:":
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            break
        # Meanwhile a normal caller is served at once.
        if time.monotonic() - started < 1.5:
            result = run("curl", "-sS", "--max-time", "5", "-H", f"Host: edge-1:{kube.http_port}",
                         f"http://127.0.0.1:{kube.ports['insecure']}/metrics")
            assert "kubelet_running_pods" in result.stdout
        slow.settimeout(1)
        try:
            answer += slow.recv(4096)
            if answer:
                break
        except socket.timeout:
            pass
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started < 15


def test_routes_dns_and_iptables_send_kubelet_traffic_to_the_tunnel(tmp_path):
    """Apply `routes iptables` with iptables-restore in a cloud namespace; `curl https://<node IP>:10250` there
    then reaches the kubelet stand-in on the edge through the tunnel (the edge cannot be dialled directly)."""
    from netns import sh, two_hosts

    node_ip = "10.0.3.7"
    with two_hosts() as (cloud, cloud_ip, edge, edge_ip):
        c = Cluster(tmp_path)
        try:
            kpki = tmp_path / "kubelet-pki"
            run(BIN / "edgetunnel", "pki", "init", "--pki-dir", kpki)
            run(BIN / "edgetunnel", "pki", "issue-server", "--pki-dir", kpki, "--ip", node_ip)
            sh("ip", "-n", edge, "addr", "add", f"{node_ip}/32", "dev", "lo")
            sh("ip", "-n", cloud, "route", "add", "10.0.3.0/24", "via", edge_ip)
            # The edge cannot be dialled: only connections it opened itself come in.
            sh("ip", "netns", "exec", edge, "iptables", "-w", "-A", "INPUT", "!", "-i", "lo", "-m", "conntrack",
               "--ctstate", "NEW", "-j", "DROP")
            events = tmp_path / "events"
            events.write_text("")
            standin = c.spawn(["ip", "netns", "exec", edge, sys.executable, HERE / "kubelet_standin.py", node_ip,
                               "10250", "10255", kpki / "server.crt", kpki / "server.key", events], "kubelet",
                              clean_exits=PYTHON_HELPER_EXITS)
            wait_until(lambda: "ready" in standin.text(), 10, "kubelet stand-in")
            server = c.spawn(["ip", "netns", "exec", cloud, BIN / "edge-tunnel-server", "--pki-dir", c.pki,
                              "--cert-ips", f"{cloud_ip},{node_ip}", "--insecure-bind-address", "0.0.0.0", "--allow-insecure-bind",
                              "--kubelet-ca-file", kpki / "ca.crt"], "server-ns")
            meta = f"http://{cloud_ip}:10265"
            wait_until(lambda: sh("ip", "netns", "exec", cloud, "curl", "-s", f"{meta}/readyz", check=False).stdout == "ok\n",
                       20, "server")
            c.spawn(["ip", "netns", "exec", edge, BIN / "edge-tunnel-agent", "--node-name", "edge-node-3",
                     "--node-ip", node_ip, "--server-address", f"{cloud_ip}:10262", "--pki-dir", tmp_path / "agent",
                     "--bootstrap-token", c.token(), "--ca-cert-hash", c.ca_hash], "agent-ns")
            wait_until(lambda: "edge-node-3" in sh("ip", "netns", "exec", cloud, "curl", "-s", f"{meta}/v1/agents",
                                                   check=False).stdout, 20, "agent")

            hosts = sh("ip", "netns", "exec", cloud, BIN / "edgetunnel", "routes", "dns", "--server", meta,
                       "--tunnel-address", cloud_ip).stdout
            assert f"{cloud_ip} edge-node-3" in hosts.splitlines()
            rules = sh("ip", "netns", "exec", cloud, BIN / "edgetunnel", "routes", "iptables", "--server", meta,
                       "--tunnel-address", cloud_ip).stdout
            assert f"-d {node_ip}/32 -p tcp --dport 10250" in rules
            # Before the rules, the kubelet is unreachable from the cloud.
            direct = sh("ip", "netns", "exec", cloud, "curl", "-s", "--max-time", "2", f"http://{node_ip}:10255/metrics",
                        check=False)
            assert direct.returncode != 0
            restore = subprocess.run(["ip", "netns", "exec", cloud, "iptables-restore", "-w", "--noflush"], input=rules,
                                     capture_output=True, text=True)
            assert restore.returncode == 0, restore.stderr
            sh("ip", "netns", "exec", cloud, "iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-j", "EDGE-TUNNEL")

            https = sh("ip", "netns", "exec", cloud, "curl", "-sS", "--max-time", "10", "--cacert", c.ca,
                       "--cert", c.cert, "--key", c.key, f"https://{node_ip}:10250/healthz")
            assert https.stdout == "kubelet ok\n"
            plain = sh("ip", "netns", "exec", cloud, "curl", "-sS", "--max-time", "10", f"http://{node_ip}:10255/metrics")
            assert "kubelet_running_pods 3" in plain.stdout
        finally:
            c.close()


def test_a_black_holed_target_is_a_504_dial_timeout(tmp_path):
    """The agent's dial never completes (the target drops SYNs): CONNECT and Host routing both answer 504."""
    from netns import sh, two_hosts

    with two_hosts(prefix="10.231.9") as (cloud, cloud_ip, edge, edge_ip):
        c = Cluster(tmp_path)
        try:
            # The target is the node's own address, port 9, and it drops SYNs.
            sh("ip", "netns", "exec", edge, "iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "DROP")
            c.spawn(["ip", "netns", "exec", cloud, BIN / "edge-tunnel-server", "--pki-dir", c.pki, "--cert-ips", cloud_ip,
                     "--insecure-bind-address", "0.0.0.0", "--allow-insecure-bind"], "server-ns")
            meta = f"http://{cloud_ip}:10265"
            wait_until(lambda: sh("ip", "netns", "exec", cloud, "curl", "-s", f"{meta}/readyz", check=False).stdout == "ok\n",
                       20, "server")
            c.spawn(["ip", "netns", "exec", edge, BIN / "edge-tunnel-agent", "--node-name", "edge-1", "--node-ip", edge_ip,
                     "--server-address", f"{cloud_ip}:10262", "--pki-dir", tmp_path / "agent", "--bootstrap-token",
                     c.token(), "--ca-cert-hash", c.ca_hash, "--allow", f"{edge_ip}:9"], "agent-ns")
            wait_until(lambda: "edge-1" in sh("ip", "netns", "exec", cloud, "curl", "-s", f"{meta}/v1/agents",
                                              check=False).stdout, 20, "agent")
            connect = subprocess.Popen(["ip", "netns", "exec", cloud, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                        "--proxy-cacert", c.ca, "--proxy-cert", c.cert, "--proxy-key", c.key, "-p", "-x",
                                        "https://127.0.0.1:10263", f"http://{edge_ip}:9/"], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            routed = subprocess.run(["ip", "netns", "exec", cloud, "curl", "-s", "-w", "\n%{http_code}", "-H",
                                     f"Host: {edge_ip}:9", "http://127.0.0.1:10264/x"], capture_output=True, text=True,
                                    timeout=40)
            body, status = routed.stdout.rsplit("\n", 1)
            assert status == "504" and body.startswith("dial timeout:"), routed.stdout
            out, err = connect.communicate(timeout=40)
            assert "504" in err or out == "504", (out, err)
        finally:
            c.close()
