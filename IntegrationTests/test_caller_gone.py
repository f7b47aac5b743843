"""Callers that give up while their stream is being opened (issue 25, finding 5).

400 callers on the Unix socket each sent `CONNECT node:port` and closed their socket 0-4 ms later, while the agent
was still dialling. 12 s later the server still counted 20 open streams and the target still held 20 connections
from the agent, for good: the server's 200 to a caller that had already closed failed (EPIPE) and closed the
caller's channel before the stream's glue was added, so nothing ever ended the stream. Every frontend opens its
streams through the same dialer, which now ties each stream to its caller's channel: a caller that goes away
cancels an open still in flight (RST to the agent, which drops the target connection) and resets an opened stream
no socket holds."""
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.harness import Cluster, free_port, http_get, read_head, wait_until


class CountingTarget:
    """A TCP target that counts the connections it holds. It reads each until EOF or a reset and then closes it, as
    a server does when its client is done: so only a connection the agent never ends stays counted."""

    def __init__(self):
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port), backlog=1024)
        self.lock = threading.Lock()
        self.open = 0
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self.lock:
                self.open += 1
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.open -= 1

    def close(self):
        self.listener.close()


def metric(url, name):
    """The value of an unlabelled metric in a Prometheus text page, or None."""
    for line in http_get(url)[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def frontends(c, uds):
    """How a caller reaches the server, per frontend: a function that returns a connected socket."""
    def unix():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Blocking: with a timeout, a connect that finds the listen backlog full fails at once (EAGAIN), where a
        # blocking one waits for the server to accept, as a real caller's does.
        s.connect(str(uds))
        s.settimeout(10)
        return s

    def secure():
        raw = socket.create_connection(("127.0.0.1", c.ports["secure"]), timeout=10)
        return c.tls_context(c.cert, c.key).wrap_socket(raw)

    return {"unix-socket": unix, "secure-port": secure}


@pytest.mark.parametrize("frontend, callers", [("unix-socket", 400), ("secure-port", 100)])
def test_callers_that_give_up_during_the_dial_leave_no_stream_behind(tmp_path, frontend, callers):
    """Callers send `CONNECT edge-1:PORT` and close 0-4 ms later, eight at a time, racing the agent's answer. Within
    a few seconds the server counts no stream and no window, the agent no stream, and the target no connection."""
    c = Cluster(tmp_path)
    target = CountingTarget()
    try:
        uds = tmp_path / "tunnel.sock"
        c.start_server("--uds-path", uds)
        agent = c.start_agent("edge-1", "--allow", f"127.0.0.1:{target.port}")
        connect = frontends(c, uds)[frontend]
        request = f"CONNECT edge-1:{target.port} HTTP/1.1\r\nHost: edge-1:{target.port}\r\n\r\n".encode()

        # A caller that waits for its answer is served (and its stream ends as it closes).
        with connect() as s:
            s.sendall(request)
            assert read_head(s).startswith(b"HTTP/1.1 200"), frontend

        rng = random.Random(25)
        patience = [rng.uniform(0, 0.004) for _ in range(callers)]

        def give_up(seconds):
            with connect() as s:
                s.sendall(request)
                time.sleep(seconds)  # how long this caller waits for its 200: not long enough

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(give_up, patience))

        last = {}

        def nothing_left():
            last.update(
                server_streams=metric(c.meta_url("/metrics"), "edge_tunnel_server_streams"),
                server_window_bytes=metric(c.meta_url("/metrics"), "edge_tunnel_server_window_budget_bytes"),
                agent_streams=metric(f"http://127.0.0.1:{agent.meta}/metrics", "edge_tunnel_agent_streams"),
                target_connections=target.open,
            )
            return all(value == 0 for value in last.values())

        try:
            wait_until(nothing_left, 10, "every stream of a caller that gave up to end")
        except AssertionError as error:
            raise AssertionError(f"{error}; still held: {last}") from None
        assert target.accepted > 1, "the callers that gave up never reached the target: nothing was tested"
        assert [a["streams"] for a in c.agents()] == [0]
    finally:
        target.close()
        c.close()
