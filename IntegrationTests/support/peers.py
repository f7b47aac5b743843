"""Raw peers for the end-to-end tests: reading HTTP heads, frames and whole streams from sockets, how a connection
ended (FIN or reset, read from the kernel's TCP state), metrics lines, a process's RSS, and `FakeServer`, a tunnel
server played frame by frame with a real certificate. `support.harness` re-exports these names."""
import json
import pathlib
import select
import socket
import ssl
import struct
import time


def read_head(sock):
    """An HTTP response head, read a byte at a time so that nothing after it is consumed (bytes; short at EOF)."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(1)
        if not data:
            break
        head += data
    return head


TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # tcpi_state (linux/tcp.h) once the peer's RST, or its FIN, has arrived


def tcp_state(sock):
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def connection_end(sock, timeout=5):
    """Reads `sock` (plain or TLS) until its peer ends the connection, and says how: "reset" (a TCP RST arrived),
    "FIN" (an orderly close, with or without TLS close_notify). Fails when it is still open after `timeout` s.

    The TCP state decides, read before the read that would see the end: Python with OpenSSL 3 reports an RST under
    TLS as ssl.SSLEOFError, exactly as a FIN without close_notify, and OpenSSL answers that EOF with an alert that
    the closed peer resets, so after the read the state is CLOSE either way."""
    deadline = time.monotonic() + timeout
    while True:
        if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                raise AssertionError(f"the connection was still open after {timeout}s")
            state = tcp_state(sock)
            if state == TCP_CLOSE:
                return "reset"
            if state == TCP_CLOSE_WAIT:
                return "FIN"
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            if not sock.recv(65536):
                return "FIN"
        except socket.timeout:
            continue
        except (ConnectionError, ssl.SSLError, OSError) as error:
            return "reset" if isinstance(error, ConnectionResetError) else f"{type(error).__name__}: {error}"


def frame(frame_type, stream_id, payload):
    return struct.pack(">BBHII", frame_type, 0, 0, stream_id, len(payload)) + payload


def read_frame(sock):
    header = recv_exact(sock, 12)
    frame_type, _, _, stream_id, length = struct.unpack(">BBHII", header)
    return frame_type, stream_id, recv_exact(sock, length)


def read_all(sock, timeout=30):
    """Everything `sock` (plain or TLS) receives until its peer's orderly end (EOF), as bytes. Each read waits at
    most `timeout` s (the socket's timeout is set to it): a connection that stays open raises socket.timeout, and
    a reset raises as it does from `recv`."""
    sock.settimeout(timeout)
    data = bytearray()
    while (chunk := sock.recv(1 << 20)):
        data += chunk
    return bytes(data)


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def metric_of(text, name):
    """A metric's value: the series `name` (labels included in it, if given), or the sum of every series of the
    metric `name` (0 when there is none)."""
    values = [float(line.split()[-1]) for line in text.splitlines() if not line.startswith("#")
              and (line.split()[0] == name or "{" not in name and line.startswith(name + "{"))]
    return sum(values)


def rss_kib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class FakeServer:
    """A hostile or scripted server on the cluster's tunnel port, with the real serving certificate: it accepts an
    agent's tunnel, reads its HELLO and answers HELLO_OK (the real server must be stopped first)."""

    def __init__(self, c, timeout=30):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(c.pki / "server.crt"), str(c.pki / "server.key"))
        self.context.load_verify_locations(str(c.ca))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server(("127.0.0.1", c.ports["tunnel"]))
        self.listener.settimeout(timeout)

    @classmethod
    def replacing(cls, c, name, *agent_args, timeout=30):
        """Joins agent `name` (with `agent_args`) through the cluster's real server, so that it holds a certificate
        and the CA, stops both, and listens in the server's place. Start the agent again with `join=False`."""
        c.start_server()
        c.start_agent(name, *agent_args).stop()
        c.server.stop()
        return cls(c, timeout)

    def hello(self):
        """The next agent tunnel and its HELLO (parsed), not answered yet."""
        conn, _ = self.listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = self.context.wrap_socket(conn, server_side=True)
        tls.settimeout(10)
        frame_type, _, payload = read_frame(tls)
        assert frame_type == 1, frame_type  # HELLO
        return tls, json.loads(payload)

    def accept(self, server_id="fake"):
        """The next agent tunnel, registered: HELLO read, HELLO_OK sent."""
        tls, _ = self.hello()
        ok = {"serverID": server_id, "maxFramePayload": 262144, "pingIntervalSeconds": 5}
        tls.sendall(frame(2, 0, json.dumps(ok).encode()))
        return tls

    @staticmethod
    def next_for(tls, stream_id):
        """Frames from the agent until the one for `stream_id` (PINGs answered), as (type, payload)."""
        while True:
            frame_type, sid, payload = read_frame(tls)
            if frame_type == 10:
                tls.sendall(frame(11, 0, payload))
            elif sid == stream_id:
                return frame_type, payload

    def close(self):
        self.listener.close()
