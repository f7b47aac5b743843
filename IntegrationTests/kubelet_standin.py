"""A kubelet stand-in for the end-to-end tests.

HTTPS on one port (certificate from its own CA) and plain HTTP on another:
GET /containerLogs/...?follow=true   chunked, one line every 100 ms: "<unix time> line <n>\\n", until the client goes
GET /exec/... (Upgrade: websocket)    101 with subprotocol v4.channel.k8s.io, then echoes every frame
GET /metrics, /healthz                a short body
POST /sha256                          the SHA-256 hex of the request body
Every closed follow stream is appended to EVENTS as "closed <unix time>".
"""
import base64
import hashlib
import http.server
import socketserver
import ssl
import struct
import sys
import threading
import time

from edge_service import answer_sha256

EVENTS = None


def log_event(text):
    with open(EVENTS, "a") as f:
        f.write(text + "\n")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/containerLogs/"):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            n = 0
            try:
                while True:
                    line = f"{time.time():.6f} line {n}\n".encode()
                    self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                    self.wfile.flush()
                    n += 1
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                log_event(f"closed {time.time():.6f}")
                return
        if self.path.startswith("/exec/") and self.headers.get("Upgrade", "").lower() == "websocket":
            key = self.headers["Sec-WebSocket-Key"]
            accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept.decode())
            self.send_header("Sec-WebSocket-Protocol", "v4.channel.k8s.io")
            self.end_headers()
            self.wfile.flush()
            self.echo_frames()
            return
        body = b"kubelet ok\n" if self.path != "/metrics" else b"# kubelet metrics\nkubelet_running_pods 3\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        answer_sha256(self)

    def echo_frames(self):
        read = self.rfile.read
        while True:
            head = read(2)
            if len(head) < 2:
                return
            opcode = head[0] & 0x0F
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", read(8))[0]
            mask = read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(read(length)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                self.wfile.flush()
                return
            out = bytes([0x80 | opcode])
            if len(data) < 126:
                out += bytes([len(data)])
            elif len(data) < 65536:
                out += bytes([126]) + struct.pack(">H", len(data))
            else:
                out += bytes([127]) + struct.pack(">Q", len(data))
            self.wfile.write(out + data)
            self.wfile.flush()


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    host, https_port, http_port, cert, key, EVENTS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
    secure = Server((host, https_port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    plain = Server((host, http_port), Handler)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    print("ready", flush=True)
    secure.serve_forever()
