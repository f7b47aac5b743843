"""Streams through the tunnel end to end (real server and agent processes, curl and Python TLS clients, a Python edge
service, targets the test plays itself): a target reached by node name and by node IP, 100 MiB each way byte-exact,
200 concurrent streams, a stalled reader beside a busy stream, a caller that goes away, a stream cut short by a killed
agent or server (an error, never a clean end), a complete answer to a slow reader, and half-close carried both
ways."""
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time

from conftest import BIN
from edge_service import blob_sha256
from support.harness import connection_end, free_port, read_all, read_head, recv_exact, rss_kib, wait_until
from support.tunnel import cluster, edge  # noqa: F401  (fixtures)


def local_listener():
    """A target the test plays itself: a listening socket on 127.0.0.1 (accepts time out after 20 s) and its port."""
    listener = socket.socket()
    listener.settimeout(20)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener, listener.getsockname()[1]


def test_connect_reaches_the_edge_service_by_node_name_and_node_ip(cluster, edge):
    by_name = cluster.curl(f"http://edge-1:{edge}/hello", check=True)
    assert by_name.stdout == "hello from the edge\n"
    by_ip = cluster.curl(f"http://127.0.0.1:{edge}/hello", check=True)
    assert by_ip.stdout == "hello from the edge\n"


def test_100_mib_each_way_is_byte_exact(cluster, edge, tmp_path):
    size = 100 * 1024 * 1024
    download = subprocess.run(
        ["curl", "-sS", "--proxy-cacert", cluster.ca, "--proxy-cert", cluster.cert, "--proxy-key", cluster.key,
         "-p", "-x", f"https://127.0.0.1:{cluster.ports['secure']}", f"http://edge-1:{edge}/blob/{size}"],
        capture_output=True, check=True, timeout=120)
    assert len(download.stdout) == size
    assert hashlib.sha256(download.stdout).hexdigest() == blob_sha256(size)

    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(size))
    answer = cluster.curl(f"http://edge-1:{edge}/sha256", "--data-binary", f"@{upload}",
                          "-H", "Content-Type: application/octet-stream", check=True)
    assert answer.stdout.strip() == hashlib.sha256(upload.read_bytes()).hexdigest()


def test_200_concurrent_streams_through_one_agent(cluster, edge):
    count = 200
    barrier = threading.Barrier(count, timeout=60)
    results = [None] * count
    expected = blob_sha256(256 * 1024)

    def worker(index):
        try:
            status, tls = cluster.connect_stream(f"edge-1:{edge}")
            assert status.startswith("HTTP/1.1 200"), status
            barrier.wait()  # every stream is open at the same time before any is used
            tls.sendall(f"GET /blob/{256 * 1024} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = read_all(tls)
            body = data.split(b"\r\n\r\n", 1)[1]
            results[index] = hashlib.sha256(body).hexdigest() == expected
            tls.close()
        except Exception as error:  # noqa: BLE001 - recorded for the assertion below
            results[index] = repr(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    failures = [r for r in results if r is not True]
    assert not failures, failures[:5]
    wait_until(lambda: cluster.agents()[0]["streams"] == 0, 10, "streams to be closed")


def test_a_stalled_reader_does_not_stop_another_stream_and_memory_stays_bounded(cluster, edge):
    # Stream A: an endless response that nobody reads.
    status, stalled = cluster.connect_stream(f"edge-1:{edge}")
    assert status.startswith("HTTP/1.1 200")
    stalled.sendall(b"GET /infinite HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(2)  # let A fill its window and every buffer on the way
    agent_pid = cluster.agent.popen.pid
    server_pid = cluster.server.popen.pid
    before = rss_kib(agent_pid) + rss_kib(server_pid)

    # Stream B moves 50 MiB while A stays stalled.
    size = 50 * 1024 * 1024
    download = subprocess.run(
        ["curl", "-sS", "--proxy-cacert", cluster.ca, "--proxy-cert", cluster.cert, "--proxy-key", cluster.key,
         "-p", "-x", f"https://127.0.0.1:{cluster.ports['secure']}", f"http://edge-1:{edge}/blob/{size}"],
        capture_output=True, check=True, timeout=60)
    assert hashlib.sha256(download.stdout).hexdigest() == blob_sha256(size)

    time.sleep(1)
    after = rss_kib(agent_pid) + rss_kib(server_pid)
    # The stalled stream may hold its window (1 MiB) plus socket buffers, never the endless body.
    assert after - before < 48 * 1024, f"RSS grew by {after - before} KiB while a reader was stalled"

    # Stream A is still alive: it delivers when read again.
    stalled.settimeout(10)
    assert len(stalled.recv(65536)) > 0
    stalled.close()


def test_a_caller_that_goes_away_closes_the_edge_side_promptly(cluster, tmp_path):
    """The target sees its connection end within 2 s of the caller vanishing mid-stream."""
    listener, port = local_listener()
    cluster.start_agent("edge-r", "--allow", f"127.0.0.1:{port}", ips=("127.0.0.3",))
    status, caller = cluster.connect_stream(f"edge-r:{port}")
    assert status.startswith("HTTP/1.1 200")
    target, _ = listener.accept()
    target.settimeout(20)
    caller.sendall(b"ping")
    assert target.recv(4) == b"ping"
    target.sendall(b"x" * 65536)
    caller.close()
    target.settimeout(5)
    started = time.monotonic()
    ended = False
    while time.monotonic() - started < 5:
        try:
            if target.recv(65536) == b"":
                ended = True
                break
        except (ConnectionResetError, socket.timeout):
            ended = True
            break
    assert ended and time.monotonic() - started < 2
    wait_until(lambda: [a for a in cluster.agents() if a["nodeName"] == "edge-r"][0]["streams"] == 0, 5,
               "the stream to be gone")


def ended_how(sock, timeout=10):
    """Reads `sock` until it ends: "error" for a TCP reset, "eof" for an orderly end (a FIN, with or without TLS
    close_notify: a client that ignores a missing close_notify, as curl does, takes it as the end of the body). None
    when it did not end within `timeout`. (Under TLS, Python reports a reset and a FIN without close_notify alike,
    as ssl.SSLEOFError: `connection_end` tells them apart by the TCP state.)"""
    try:
        how = connection_end(sock, timeout)
    except AssertionError:  # still open
        return None
    return {"reset": "error", "FIN": "eof"}.get(how, how)


def plain_connect(port, target, receive_buffer=None):
    sock = socket.socket()
    sock.settimeout(20)
    if receive_buffer:  # before connecting: the window the caller offers stays this small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def test_a_stream_cut_short_ends_with_an_error_never_a_clean_end(cluster, tmp_path):
    """A read-until-close transfer cut short must not look complete. The agent killed: its streams wait for it to
    resume them (a pause, no end), and when it comes back restarted, without their token, callers on the TLS port
    and the plain port see a reset (TLS: no close_notify), not EOF. The server killed and restarted: the agent's
    streams cannot resume, and it resets the target's connection. Meanwhile a transfer that ends in order still
    ends with a clean EOF."""
    listener, port = local_listener()
    agent = cluster.start_agent("edge-c", "--allow", f"127.0.0.1:{port}", ips=("127.0.0.5",))

    # In order: the target sends and closes; the caller reads it all, then a clean EOF.
    status, caller = cluster.connect_stream(f"edge-c:{port}")
    assert status.startswith("HTTP/1.1 200")
    target, _ = listener.accept()
    target.sendall(b"x" * 100000)
    target.close()
    received = read_all(caller, timeout=10)
    assert len(received) == 100000
    caller.close()

    # The agent dies mid-transfer. (Python's default hides a TLS end without close_notify: not here.)
    raw = socket.create_connection(("127.0.0.1", cluster.ports["secure"]), timeout=20)
    tls_caller = cluster.tls_context(cluster.cert, cluster.key).wrap_socket(raw, suppress_ragged_eofs=False)
    tls_caller.sendall(f"CONNECT edge-c:{port} HTTP/1.1\r\nHost: edge-c:{port}\r\n\r\n".encode())
    head = read_head(tls_caller)
    assert head.startswith(b"HTTP/1.1 200"), head
    tls_target, _ = listener.accept()
    plain_caller = plain_connect(cluster.ports["insecure"], f"edge-c:{port}")
    plain_target, _ = listener.accept()
    for target, caller in ((tls_target, tls_caller), (plain_target, plain_caller)):
        target.sendall(b"y" * 65536)
        caller.settimeout(10)
        got = 0
        while got < 65536:
            got += len(caller.recv(65536))
    agent.send_signal(signal.SIGKILL)
    agent.popen.wait(10)
    assert {"tls": ended_how(tls_caller, 2), "plain": ended_how(plain_caller, 2)} == {"tls": None, "plain": None}
    restarted = cluster.start_agent("edge-c", "--allow", f"127.0.0.1:{port}", ips=("127.0.0.5",), join=False,
                                    pki=tmp_path / "agent-edge-c")
    assert {"tls": ended_how(tls_caller), "plain": ended_how(plain_caller)} == {"tls": "error", "plain": "error"}
    for sock in (tls_caller, plain_caller, tls_target, plain_target):
        sock.close()

    # The server dies mid-upload: the agent's stream waits, then the restarted server cannot resume it, and the
    # agent resets the target's connection.
    _, caller = cluster.connect_stream(f"edge-c:{port}")
    target, _ = listener.accept()
    caller.sendall(b"z" * 65536)
    target.settimeout(10)
    got = 0
    while got < 65536:
        got += len(target.recv(65536))
    cluster.server.send_signal(signal.SIGKILL)
    cluster.server.popen.wait(10)
    cluster.start_server()
    assert ended_how(target, 20) == "error"
    restarted.expect_log("could not resume the lost tunnel's streams")
    caller.close()
    target.close()


def test_a_complete_answer_reaches_a_slow_reader_whole(cluster):
    """Through the plain port. A caller that half-closes after its request and reads its answer late gets all of
    it, then EOF: the server still holds part of the answer when the target's FIN arrives, and finishing the
    socket must not drop it. A caller whose answer had fully arrived when the tunnel died gets it whole too: the
    stream had ended in order towards it."""
    listener, port = local_listener()
    agent = cluster.start_agent("edge-s", "--allow", f"127.0.0.1:{port}", ips=("127.0.0.6",))
    # More than the kernel takes for a caller that does not read (about 3.5 MiB on loopback), less than that plus
    # the stream's first window (1 MiB): the rest waits in the server, and the FIN arrives behind it at once.
    answer = os.urandom(4 * 1024 * 1024)

    def answer_and_close(target):
        target.settimeout(None)
        target.sendall(answer)
        target.close()

    for half_close, kill_agent in ((True, False), (False, True)):
        caller = plain_connect(cluster.ports["insecure"], f"edge-s:{port}", receive_buffer=8192)
        target, _ = listener.accept()
        caller.sendall(b"request")
        if half_close:
            caller.shutdown(socket.SHUT_WR)
            assert read_all(target) == b"request"
        else:
            assert recv_exact(target, 7) == b"request"
        before = cluster.agents()[0]["bytesFromAgent"]
        sender = threading.Thread(target=answer_and_close, args=(target,))
        sender.start()
        # The answer waits in front of the caller, and the FIN arrives behind it (in the same write as its end).
        # How much the kernel takes for a caller that does not read depends on the server's send buffer, which
        # Linux grows with the connection's progress: under load (three workers on two cores) it took less than the
        # 3 MiB this needs, and neither the target's write nor the server's copy of the answer completed. So the
        # caller reads a little at a time until both have; what it has not read stays in the server and the kernel,
        # with the FIN behind it.
        early = bytearray()
        deadline = time.monotonic() + 30
        while sender.is_alive() or cluster.agents()[0]["bytesFromAgent"] < before + len(answer):
            assert time.monotonic() < deadline, "the whole answer never reached the server"
            caller.settimeout(1)
            try:
                early += caller.recv(64 * 1024)
            except socket.timeout:
                pass
            time.sleep(0.05)
        assert len(early) < len(answer), "the caller read everything early: nothing waited in the server"
        time.sleep(0.5)
        if kill_agent:
            agent.send_signal(signal.SIGKILL)
            agent.popen.wait(10)
        received = bytes(early) + read_all(caller)
        assert (len(received), hashlib.sha256(received).hexdigest()) == (len(answer), hashlib.sha256(answer).hexdigest())
        caller.close()


def test_half_close_is_carried_both_ways(cluster, tmp_path):
    """Through `edgetunnel forward` (plain TCP locally): the caller shuts down its sending side, the target
    reads to EOF and answers, then closes; the caller receives the answer and EOF."""
    listener, port = local_listener()
    cluster.start_agent("edge-h", "--allow", f"127.0.0.1:{port}", ips=("127.0.0.4",))
    local = free_port()
    forward = cluster.spawn([BIN / "edgetunnel", "forward", "--server", f"127.0.0.1:{cluster.ports['secure']}",
                             "--ca-file", cluster.ca, "--cert", cluster.cert, "--key", cluster.key,
                             "--listen", f"127.0.0.1:{local}", "--to", f"edge-h:{port}"], "forward")
    wait_until(lambda: "forwarding" in forward.text(), 10, "forward to listen")
    payload = os.urandom(3 * 1024 * 1024)

    def target_side():
        conn, _ = listener.accept()
        digest = hashlib.sha256(read_all(conn, timeout=20))
        conn.sendall(digest.hexdigest().encode())
        conn.close()

    thread = threading.Thread(target=target_side)
    thread.start()
    caller = socket.create_connection(("127.0.0.1", local), timeout=20)
    caller.sendall(payload)
    caller.shutdown(socket.SHUT_WR)
    answer = read_all(caller, timeout=20)
    thread.join(20)
    assert answer.decode() == hashlib.sha256(payload).hexdigest()
