"""Host-routed requests with bodies, and forward-proxy requests in absolute form, through a real server and agent."""
import hashlib
import json
import os
import socket
import types
import urllib.parse

import pytest

from support.harness import PYTHON_HELPER_EXITS, Cluster, free_port, http_get, read_all, run, wait_until
from support.kubelet import start_kubelet_standin

SIZES = [0, 1024, 1 << 20, 64 << 20]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Server, agent edge-1, an edge service (plain) and a kubelet stand-in (HTTPS) on the edge."""
    tmp = tmp_path_factory.mktemp("routing")
    c = Cluster(tmp)
    try:
        c.uds = tmp / "connect.sock"
        c.start_server("--kubelet-ca-file", start_kubelet_standin(c, tmp, "edge-1"), "--uds-path", c.uds)
        c.edge_port = c.start_edge_service()
        c.agent = c.start_agent("edge-1", "--allow", f"127.0.0.1:{c.edge_port}", "--allow", f"127.0.0.1:{c.https_port}")
        c.bodies = {size: os.urandom(size) for size in SIZES}
        yield c
    finally:  # also when the set-up failed: no process outlives the test
        c.close()


def read_response(sock):
    """The status line and the body of a response framed by Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 20)
        assert chunk, f"closed before the end of the response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        chunk = sock.recv(1 << 20)
        assert chunk, "closed before the end of the body"
        body += chunk
    return lines[0], body


def read_buffered_response(stream):
    """One response framed by Content-Length from a buffered reader: pipelined answers may share a read."""
    status = stream.readline().decode().rstrip("\r\n")
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, stream.read(length)


def post(sock, host, body, one_write):
    head = (f"POST /sha256 HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    if one_write:
        sock.sendall(head + body)
    else:
        sock.sendall(head[:7])
        sock.sendall(head[7:])
        step = 1000 if len(body) <= (1 << 20) else 65536
        for start in range(0, len(body), step):
            sock.sendall(body[start:start + step])
    return read_response(sock)


@pytest.mark.parametrize("one_write", [True, False], ids=["one-write", "many-writes"])
@pytest.mark.parametrize("size", SIZES)
def test_bodies_arrive_byte_exact_on_the_insecure_port(lab, size, one_write):
    """A body sent with the head, or after it in many writes, reaches the edge service whole (a 1 MiB body used
    to hang: bytes that came while the stream was opening were dropped)."""
    with socket.create_connection(("127.0.0.1", lab.ports["insecure"]), timeout=60) as sock:
        status, body = post(sock, f"edge-1:{lab.edge_port}", lab.bodies[size], one_write)
    assert status == "HTTP/1.1 200 OK", status
    assert body.decode().strip() == hashlib.sha256(lab.bodies[size]).hexdigest()


@pytest.mark.parametrize("one_write", [True, False], ids=["one-write", "many-writes"])
@pytest.mark.parametrize("size", SIZES)
def test_bodies_arrive_byte_exact_at_the_kubelet_over_the_secure_port(lab, size, one_write):
    with socket.create_connection(("127.0.0.1", lab.ports["secure"]), timeout=60) as raw:
        with lab.tls_context(lab.cert, lab.key).wrap_socket(raw) as tls:
            status, body = post(tls, f"edge-1:{lab.https_port}", lab.bodies[size], one_write)
    assert status == "HTTP/1.1 200 OK", status
    assert body.decode().strip() == hashlib.sha256(lab.bodies[size]).hexdigest()


def test_keep_alive_requests_reach_the_target_as_parsed_with_chunked_bodies_rechunked(lab):
    """Three requests on one Host-routed connection, one of them chunked with a would-be smuggled request inside a
    chunk: the target answers exactly three, in order, each body byte-exact (the server decodes every request
    with NIOHTTP1 and writes it on as it parsed it)."""
    hidden = b"0\r\n\r\nGET /headers HTTP/1.1\r\nHost: x\r\n\r\n"
    pieces = [os.urandom(1000), hidden, os.urandom(70000)]
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\nX-Trailer: t\r\n\r\n"
    host = f"edge-1:{lab.edge_port}"
    plain = os.urandom(5000)
    requests = (f"POST /sha256 HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunked
                + f"GET /headers HTTP/1.1\r\nHost: {host}\r\nX-Second: 2\r\n\r\n".encode()
                + f"POST /sha256 HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(plain)}\r\n\r\n".encode() + plain)
    for write in ("one", "bytewise-head"):
        with socket.create_connection(("127.0.0.1", lab.ports["insecure"]), timeout=30) as sock:
            if write == "one":
                sock.sendall(requests)
            else:
                for i in range(0, 300):
                    sock.sendall(requests[i:i + 1])
                sock.sendall(requests[300:])
            answers = sock.makefile("rb")
            first, second, third = (read_buffered_response(answers) for _ in range(3))
            sock.settimeout(2)
            try:
                extra = answers.read1(65536)
            except socket.timeout:
                extra = b""
        assert first == ("HTTP/1.1 200 OK", (hashlib.sha256(b"".join(pieces)).hexdigest() + "\n").encode())
        assert second[0] == "HTTP/1.1 200 OK"
        seen = json.loads(second[1])
        assert seen["requestline"] == "GET /headers HTTP/1.1" and ["X-Second", "2"] in seen["headers"]
        assert third == ("HTTP/1.1 200 OK", (hashlib.sha256(plain).hexdigest() + "\n").encode())
        assert extra == b"", f"the target answered a request nobody sent: {extra[:200]!r}"


def test_a_request_that_only_looks_like_an_upgrade_keeps_the_connection_parsed(lab):
    """`Upgrade` without `Connection: upgrade` is no upgrade for llhttp: the next pipelined request is decoded and
    forwarded like the first (a hostile review found the server trapping on exactly this)."""
    host = f"edge-1:{lab.edge_port}"
    with socket.create_connection(("127.0.0.1", lab.ports["insecure"]), timeout=10) as sock:
        sock.sendall(f"GET /hello HTTP/1.1\r\nHost: {host}\r\nUpgrade: x\r\n\r\n"
                     f"GET /headers HTTP/1.1\r\nHost: {host}\r\nConnection: upgrade\r\n\r\n"
                     f"GET /hello HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        answers = sock.makefile("rb")
        statuses = [read_buffered_response(answers)[0] for _ in range(3)]
    assert statuses == ["HTTP/1.1 200 OK"] * 3, statuses
    assert lab.server.alive()


def test_bytes_sent_with_a_connect_and_a_half_close_arrive(lab):
    """CONNECT, a payload and the caller's FIN in one go (`printf ... | nc -N`): the payload reaches the target
    before the FIN, which the target sees as the end of the request."""
    payload = "GET /hello HTTP/1.0\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", lab.ports["insecure"]), timeout=10) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{lab.edge_port} HTTP/1.1\r\nHost: edge-1\r\n\r\n{payload}".encode())
        sock.shutdown(socket.SHUT_WR)
        data = read_all(sock, timeout=10)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"hello from the edge\n"), data[-200:]


def test_absolute_form_requests_are_forwarded_as_plain_http_on_every_entry(lab):
    """curl without -p sends `GET http://edge-1:PORT/... HTTP/1.1` to its proxy, as Go's client (Prometheus) does:
    the target gets plain HTTP in origin form, hop-by-hop headers removed, with Connection: close."""
    url = f"http://edge-1:{lab.edge_port}/headers?x=1"
    extra = ["-H", "Proxy-Connection: keep-alive", "-H", "Connection: keep-alive, X-Hop", "-H", "X-Hop: secret",
             "-H", "X-Kept: yes", "-H", "Keep-Alive: timeout=5"]
    secure = run("curl", "-sS", "--fail-with-body", "--proxy-cacert", lab.ca, "--proxy-cert", lab.cert, "--proxy-key",
                 lab.key, "-x", f"https://127.0.0.1:{lab.ports['secure']}", *extra, url)
    insecure = run("curl", "-sS", "--fail-with-body", "-x", f"http://127.0.0.1:{lab.ports['insecure']}", *extra, url)
    # The Unix socket, as a co-located caller would use it: the same request line, in absolute form.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(lab.uds))
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: edge-1:{lab.edge_port}\r\nProxy-Connection: keep-alive\r\n"
                     "Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nX-Kept: yes\r\nKeep-Alive: timeout=5\r\n\r\n".encode())
        status, body = read_response(sock)
    assert status == "HTTP/1.1 200 OK", status
    unix = types.SimpleNamespace(stdout=body.decode())
    for answer in (secure, insecure, unix):
        seen = json.loads(answer.stdout)
        assert seen["requestline"] == "GET /headers?x=1 HTTP/1.1"
        headers = {name.lower(): value for name, value in seen["headers"]}
        assert headers["host"] == f"edge-1:{lab.edge_port}"
        assert headers["connection"] == "close"
        assert headers["x-kept"] == "yes"
        for hop in ("proxy-connection", "keep-alive", "x-hop"):
            assert hop not in headers, (hop, headers)
    # Origin-form with a Host on the secure port is still the kubelet (HTTPS) route.
    kubelet = run("curl", "-sS", "--cacert", lab.ca, "--cert", lab.cert, "--key", lab.key,
                  "--connect-to", f"edge-1:{lab.https_port}:127.0.0.1:{lab.ports['secure']}",
                  "-H", f"Host: edge-1:{lab.https_port}", "-k", f"https://edge-1:{lab.https_port}/healthz")
    assert kubelet.stdout == "kubelet ok\n"


def test_a_head_over_64_kib_in_one_write_is_refused(lab):
    head = f"GET / HTTP/1.1\r\nHost: edge-1:{lab.edge_port}\r\nX-Big: {'a' * (65 * 1024)}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", lab.ports["insecure"]), timeout=10) as sock:
        sock.sendall(head)
        status, _ = read_response(sock)
    assert status == "HTTP/1.1 431 Request Header Fields Too Large", status


def test_prometheus_scrapes_a_node_exporter_on_an_edge_node_through_the_tunnel(tmp_path):
    """A real Prometheus (Debian's package) with `proxy_url: https://SERVER:SECURE` and the operator's client
    certificate in `tls_config` scrapes a real node exporter on edge node edge-1: Go's client sends the scrape
    as `GET http://edge-1:PORT/metrics` in absolute form, which used to be sent to the kubelet route (502)."""
    c = Cluster(tmp_path)
    try:
        c.start_server()
        exporter_port, prometheus_port = free_port(), free_port()
        exporter = c.spawn(["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{exporter_port}"],
                           "node-exporter", clean_exits=PYTHON_HELPER_EXITS)
        wait_until(lambda: socket.create_connection(("127.0.0.1", exporter_port), 1).close() is None, 20,
                   "the node exporter")
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{exporter_port}")
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{
                "job_name": "edge",
                "proxy_url": f"https://127.0.0.1:{c.ports['secure']}",
                "tls_config": {"ca_file": str(c.ca), "cert_file": str(c.cert), "key_file": str(c.key)},
                "static_configs": [{"targets": [f"edge-1:{exporter_port}"]}],
            }],
        }))  # JSON is YAML
        prometheus = c.spawn(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                              f"--web.listen-address=127.0.0.1:{prometheus_port}"], "prometheus",
                             clean_exits=PYTHON_HELPER_EXITS)
        api = f"http://127.0.0.1:{prometheus_port}/api/v1/query?query="

        def query(expression):
            status, body = http_get(api + urllib.parse.quote(expression))
            assert status == 200, body
            return json.loads(body)["data"]["result"]

        wait_until(lambda: [r["value"][1] for r in query('up{job="edge"}')] == ["1"], 60, "up == 1 for edge-1")
        build_info = query('node_exporter_build_info{job="edge"}')
        assert build_info and build_info[0]["metric"]["instance"] == f"edge-1:{exporter_port}"
        assert float(query('scrape_samples_scraped{job="edge"}')[0]["value"][1]) > 100
        assert "WRONG_VERSION_NUMBER" not in c.server.text()
        assert prometheus.alive() and exporter.alive()
    finally:
        c.close()


def test_the_insecure_port_binds_beyond_loopback_only_when_told_so(tmp_path):
    """10264 proxies without authentication: a non-loopback --insecure-bind-address is refused with one line,
    and with --allow-insecure-bind the server starts and says so as critical."""
    c = Cluster(tmp_path)
    try:
        server = c.start_server("--insecure-bind-address", "0.0.0.0", wait=False).expect_exit()
        assert server.popen.wait(20) != 0
        errors = [line for line in server.own_text().splitlines() if "error:" in line]
        assert len(errors) == 1 and "--insecure-bind-address 0.0.0.0 is not a loopback address" in errors[0], errors
        assert "--allow-insecure-bind" in errors[0]
        c.start_server("--insecure-bind-address", "0.0.0.0", "--allow-insecure-bind")
        c.server.expect_log("proxies WITHOUT AUTHENTICATION")
        assert "critical" in [line for line in c.server.own_text().splitlines() if "WITHOUT" in line][0]
    finally:
        c.close()
