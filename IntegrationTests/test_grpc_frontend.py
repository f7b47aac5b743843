"""The gRPC frontend (`--grpc-uds-path`, issue 28): kube-apiserver's egress selector in GRPC mode, played by a real
gRPC client (grpcio, stubs generated from Protos/konnectivity.proto at test time; see konnectivity_client.py).

Each test proves one thing a kube-apiserver on GRPC depends on, against the real server, agent and edge service:
dials by node name and IP; bytes exact both ways; many dials at once, on one connection and on one connection each;
one slow reader does not stall the others; each failure a one-line DIAL_RSP error; DIAL_CLS and malformed packets
end only what they concern; DRAIN; a client of an older release. Clients that are killed, vanish, time out or never
read, the caller limit and the rendered egress configuration are in test_grpc_frontend_lifecycle.py.
"""
import os
import pathlib
import signal
import stat
import subprocess
import sys
import threading
import time

import grpc
import pytest

import konnectivity_client as kc
from edge_service import blob, blob_sha256
from support.grpc_lab import server_metric, fetch
from support.grpc_lab import lab  # noqa: F401  (fixture)
from support.harness import rss_kib, wait_until


def test_dials_by_node_name_and_by_node_ip_and_both_closes(lab):
    """A dial by node name and one by the node's IP reach the edge service; CLOSE_REQ is answered by CLOSE_RSP, and
    a target that closes sends CLOSE_RSP by itself. The socket is the owner's only (0600)."""
    assert stat.S_IMODE(os.stat(lab.grpc_sock).st_mode) == 0o600
    with kc.channel(lab.grpc_sock) as channel:
        proxy = kc.Proxy(channel)
        for host in ("edge-1", "127.0.0.1"):
            connection = proxy.connect(f"{host}:{lab.edge_port}")
            head, body = fetch(connection, "/hello")  # the service closes after answering: CLOSE_RSP without asking
            assert head.startswith("HTTP/1.1 200") and body == b"hello from the edge\n", (host, head)
            assert connection.close_response().error == ""
        # A connection the client closes while the target keeps it open.
        connection = proxy.connect(f"edge-1:{lab.edge_port}")
        connection.send(b"GET /follow/1000 HTTP/1.1\r\nHost: edge\r\n\r\n")
        assert connection.recv().startswith(b"HTTP/1.1 200")
        connection.close()
        assert connection.close_response().error == ""
        wait_until(lambda: server_metric(lab, "edge_tunnel_server_streams") == 0, 10, "the stream ended")
        assert server_metric(lab, 'edge_tunnel_server_frontend_dials_total{frontend="grpc",result="opened"}') == 3
        assert server_metric(lab, 'edge_tunnel_server_frontend_connections{frontend="grpc"}') == 0
        assert server_metric(lab, 'edge_tunnel_server_frontend_rpcs{frontend="grpc"}') == 1
        proxy.finish()
        assert proxy.wait_ended()[0] == grpc.StatusCode.OK


def test_100_mib_each_way_byte_exact(lab):
    """100 MiB up (the edge service hashes the body) and 100 MiB down (hashed here), at the same time on one RPC."""
    size = 100 * 1024 * 1024
    with kc.channel(lab.grpc_sock) as channel:
        proxy = kc.Proxy(channel)
        up = proxy.connect(f"edge-1:{lab.edge_port}")
        down = proxy.connect(f"edge-1:{lab.edge_port}")
        result = {}

        def upload():
            up.send(f"POST /sha256 HTTP/1.1\r\nHost: e\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
            for chunk in blob(size):
                up.send(chunk)
            result["up"] = kc.split_response(up.read_all(timeout=120))

        uploader = threading.Thread(target=upload)
        uploader.start()
        down.send(kc.http_request(f"/blob/{size}"))
        import hashlib
        digest, received, head = hashlib.sha256(), 0, b""
        while data := down.recv(timeout=120):
            if not head:
                head, _, data = data.partition(b"\r\n\r\n")
                while not _ and (more := down.recv(timeout=120)):  # the head split across packets
                    head, _, data = (head + more).partition(b"\r\n\r\n")
            digest.update(data)
            received += len(data)
        uploader.join(180)
        assert head.startswith(b"HTTP/1.1 200") and received == size
        assert digest.hexdigest() == blob_sha256(size)
        assert result["up"][1].decode().strip() == blob_sha256(size)


@pytest.mark.parametrize("layout", ["one connection, an RPC per dial", "a connection per dial"])
def test_50_dials_at_once(lab, layout):
    """50 clients dial at once, either as RPCs on one gRPC connection (newer konnectivity clients) or each on a
    connection of its own (older kube-apiservers); each gets its own bytes, exactly."""
    shared = kc.channel(lab.grpc_sock)
    size = 300_000
    errors, done = [], []

    def client(index):
        channel = shared if layout.startswith("one") else kc.channel(lab.grpc_sock)
        try:
            proxy = kc.Proxy(channel)
            head, body = fetch(proxy.connect(f"edge-1:{lab.edge_port}"), f"/blob/{size + index}")
            import hashlib
            assert head.startswith("HTTP/1.1 200") and hashlib.sha256(body).hexdigest() == blob_sha256(size + index)
            proxy.finish()
            done.append(index)
        except Exception as error:  # reported below, with the others
            errors.append((index, repr(error)))
        finally:
            if channel is not shared:
                channel.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    shared.close()
    assert not errors and len(done) == 50, errors[:5]
    wait_until(lambda: server_metric(lab, "edge_tunnel_server_streams") == 0, 10, "every stream ended")


def test_a_client_that_stops_reading_one_stream_stalls_only_that_stream(lab):
    """One RPC downloads an endless stream and stops reading it; another on the same gRPC connection still
    downloads 50 MiB exactly, and the server holds about a window for the stalled one, not what the target sends.
    When the stalled one reads again, its bytes come in order."""
    with kc.channel(lab.grpc_sock) as channel:
        stalled = kc.Proxy(channel, read=False)
        stalled.send(kc.dial_request(f"edge-1:{lab.edge_port}", random_number=7))
        base = rss_kib(lab.server.popen.pid)
        # The DIAL_RSP waits unread too; the connectID is the first this server granted.
        wait_until(lambda: server_metric(lab, 'edge_tunnel_server_frontend_connections{frontend="grpc"}') == 1, 10,
                   "the stalled RPC's connection")
        stalled.send(kc.pb.Packet(type=kc.pb.DATA, data=kc.pb.Data(connectID=1, data=kc.http_request("/infinite"))))
        time.sleep(1)  # the target fills every buffer between it and the stalled reader
        size = 50 * 1024 * 1024
        other = kc.Proxy(channel)
        head, body = fetch(other.connect(f"edge-1:{lab.edge_port}"), f"/blob/{size}")
        import hashlib
        assert head.startswith("HTTP/1.1 200") and hashlib.sha256(body).hexdigest() == blob_sha256(size)
        grown = rss_kib(lab.server.popen.pid) - base
        assert grown < 48 * 1024, f"the server grew by {grown} KiB while one reader stalled"
        stalled.start_reading()
        assert stalled.dial_response(7).connectID == 1
        connection = kc.Connection(stalled, 1)
        first = connection.recv()
        assert first.startswith(b"HTTP/1.1 200"), first[:80]
        assert len(connection.recv()) > 0


def test_dial_failures_are_one_line_dial_responses(lab):
    """An unknown node, a port outside the agent's allow list, an address that is not host:port and a protocol
    other than tcp: each a DIAL_RSP with a one-line error, and the RPC goes on."""
    with kc.channel(lab.grpc_sock) as channel:
        proxy = kc.Proxy(channel)
        cases = {
            f"edge-9:{lab.edge_port}": "no agent for node edge-9",
            "edge-1:1": "refused by agent policy: 127.0.0.1:1 is not on the allow list of node edge-1",
            "edge-1": "is not host:port",
        }
        for address, words in cases.items():
            response = proxy.dial(address)
            assert response.connectID == 0 and words in response.error and "\n" not in response.error, response
        request = kc.dial_request(f"edge-1:{lab.edge_port}", protocol="udp")
        proxy.send(request)
        assert "only tcp" in proxy.dial_response(request.dialRequest.random).error
        head, body = fetch(proxy.connect(f"edge-1:{lab.edge_port}"), "/hello")
        assert body == b"hello from the edge\n"
        assert server_metric(lab, 'edge_tunnel_server_frontend_dials_total{frontend="grpc",result="failed"}') == 4


def test_a_200_000_byte_address_gets_a_short_one_line_refusal_and_the_rpc_goes_on(lab):
    """An attacker's DIAL_REQ whose address is 200,000 bytes (a host of that length with a port, and one without):
    each answered by a DIAL_RSP whose error is one line and short (the address is shortened in it, not echoed
    whole), no stream is opened for it, and the same RPC then dials a real node."""
    with kc.channel(lab.grpc_sock) as channel:
        proxy = kc.Proxy(channel)
        for address in ("n" * 200_000 + f":{lab.edge_port}", "h" * 200_000):
            response = proxy.dial(address)
            assert response.connectID == 0 and response.error, response
            assert "\n" not in response.error and len(response.error) < 400, response.error[:400]
        head, body = fetch(proxy.connect(f"edge-1:{lab.edge_port}"), "/hello")
        assert body == b"hello from the edge\n"
        assert server_metric(lab, 'edge_tunnel_server_frontend_dials_total{frontend="grpc",result="failed"}') == 2
        wait_until(lambda: server_metric(lab, "edge_tunnel_server_streams") == 0, 10, "no stream left behind")


def test_malformed_packets_end_only_their_rpc_or_their_connection(lab):
    """DATA for a connectID never granted and a second DIAL_REQ with a random in use are refused on their own
    (CLOSE_RSP / DIAL_RSP with an error); an unknown packet type, a packet the server sends, a packet without its
    payload end their RPC with INVALID_ARGUMENT and the reason, and a DATA packet over the 1-MiB limit resets it. Another RPC on the same connection is untouched."""
    with kc.channel(lab.grpc_sock) as channel:
        good = kc.Proxy(channel)
        kept = good.connect(f"edge-1:{lab.edge_port}")
        kept.send(b"GET /follow/1000 HTTP/1.1\r\nHost: edge\r\n\r\n")
        assert kept.recv().startswith(b"HTTP/1.1 200")

        proxy = kc.Proxy(channel)
        proxy.send(kc.pb.Packet(type=kc.pb.DATA, data=kc.pb.Data(connectID=424242, data=b"x")))
        assert "connectID 424242 is not open" in proxy.wait_for(lambda: proxy.closes.get(424242), 10, "CLOSE_RSP").error
        first = proxy.dial(f"edge-1:{lab.edge_port}", random_number=99)
        assert first.connectID != 0
        again = kc.dial_request(f"edge-1:{lab.edge_port}", random_number=99)
        proxy.send(again)
        proxy.wait_for(lambda: None if proxy.dial_responses[99].connectID else True, 10, "the second DIAL_RSP")
        assert "random 99 is already in use" in proxy.dial_responses[99].error

        endings = {
            "unknown packet type 99": lambda p: p.send(kc.pb.Packet(type=99)),
            "DIAL_RSP is sent by the server": lambda p: p.send(kc.pb.Packet(type=kc.pb.DIAL_RSP)),
            "DATA without data": lambda p: p.send(kc.pb.Packet(type=kc.pb.DATA)),
        }
        for words, send in endings.items():
            rpc = kc.Proxy(channel)
            connection = rpc.connect(f"edge-1:{lab.edge_port}")
            send(rpc)
            code, details = rpc.wait_ended(10)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, (code, details)
        rpc = kc.Proxy(channel)
        connection = rpc.connect(f"edge-1:{lab.edge_port}")
        connection.send(b"x" * (2 * 1024 * 1024), chunk=2 * 1024 * 1024)
        # grpc-swift refuses the message as it arrives and resets the HTTP/2 stream: grpcio reports CANCELLED.
        assert rpc.wait_ended(10)[0] != grpc.StatusCode.OK
        # Every connectID of the ended RPCs was reset; the good RPC's stream still follows its log.
        assert len(kept.recv()) > 0
        wait_until(lambda: server_metric(lab, "edge_tunnel_server_streams") == 2, 10, "only the live streams left")


def test_drain_from_a_client_and_from_a_server_that_stops(lab):
    """A client's DRAIN is not answered: its open connections go on and it gets no new ones (as konnectivity treats
    a draining agent). A server that is stopped tells every open RPC with DRAIN before it goes."""
    with kc.channel(lab.grpc_sock) as channel:
        proxy = kc.Proxy(channel)
        follow = proxy.connect(f"edge-1:{lab.edge_port}")
        follow.send(b"GET /follow/1000 HTTP/1.1\r\nHost: edge\r\n\r\n")
        assert follow.recv().startswith(b"HTTP/1.1 200")
        proxy.send(kc.pb.Packet(type=kc.pb.DRAIN, drain=kc.pb.Drain()))
        assert "sent DRAIN" in proxy.dial(f"edge-1:{lab.edge_port}").error
        assert len(follow.recv()) > 0 and len(follow.recv()) > 0
        other = kc.Proxy(channel)
        other.connect(f"edge-1:{lab.edge_port}")
        lab.server.send_signal(signal.SIGTERM)
        packet = other.other.get(timeout=10)
        assert packet.type == kc.pb.DRAIN
        proxy.cancel()
        other.cancel()
        lab.server.expect_exit()


def test_a_client_of_an_older_release_is_served(lab, tmp_path):
    """konnectivity's older releases have no DRAIN (type 6, field 8) and carry `bearerToken = 4` in DialResponse.
    A client built from that older .proto (in a process of its own: protobuf's registry is per process) dials and
    moves bytes, and the DRAIN a stopping server sends reaches it as an unknown packet type (proto3 keeps the
    number) instead of breaking its stream."""
    old = (pathlib.Path(kc.ROOT) / "Protos" / "konnectivity.proto").read_text()
    old = old.replace("  DRAIN = 6;\n", "").replace("    Drain drain = 8;\n", "").replace("message Drain {}\n", "")
    old = old.replace("  int64 random = 3;\n  // Older", "  int64 random = 3;\n  string bearerToken = 4;\n  // Older")
    assert "DRAIN" not in old and "bearerToken = 4" in old
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "konnectivity_old.proto").write_text(old)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", stubs, f"--python_out={stubs}",
                    f"--grpc_python_out={stubs}", stubs / "konnectivity_old.proto"], check=True)
    script = f"""
import queue, sys
sys.path.insert(0, {str(stubs)!r})
import grpc, konnectivity_old_pb2 as pb, konnectivity_old_pb2_grpc as stubs
outgoing = queue.Queue()
with grpc.insecure_channel("unix:{lab.grpc_sock}") as channel:
    replies = stubs.ProxyServiceStub(channel).Proxy(iter(outgoing.get, None), timeout=60)
    outgoing.put(pb.Packet(type=pb.DIAL_REQ, dialRequest=pb.DialRequest(protocol="tcp",
                                                                       address="edge-1:{lab.edge_port}", random=42)))
    answer = next(replies)
    assert answer.type == pb.DIAL_RSP and answer.dialResponse.random == 42 and answer.dialResponse.connectID, answer
    outgoing.put(pb.Packet(type=pb.DATA, data=pb.Data(connectID=answer.dialResponse.connectID,
                                                      data=b"GET /follow/1000 HTTP/1.1\\r\\nHost: edge\\r\\n\\r\\n")))
    first = next(replies)
    assert first.type == pb.DATA and first.data.data.startswith(b"HTTP/1.1 200"), first
    print("ready", flush=True)
    sys.stdin.readline()
    while (packet := next(replies)).type == pb.DATA:
        pass
    print("type", int(packet.type), flush=True)
    replies.cancel()
"""
    client = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        ready = client.stdout.readline().strip()
        assert ready == "ready", client.stderr.read() if client.poll() is not None else ready
        lab.server.send_signal(signal.SIGTERM)
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "type 6"  # DRAIN, a number this release has no name for
    finally:
        client.kill()
        client.wait(10)
    lab.server.expect_exit()
