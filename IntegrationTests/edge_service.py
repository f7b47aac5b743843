"""An HTTP service standing in for an edge node's kubelet or app, for the end-to-end tests.

GET /blob/N        N deterministic pseudo-random bytes (streamed)
GET /infinite      an endless stream of bytes (for stalled-reader tests)
GET /follow/N      N lines, chunked, one every 50 ms (like `kubectl logs -f`)
POST /sha256       answers the SHA-256 hex of the request body
GET /headers       the request line and headers as received (JSON)
GET /hello         a short greeting
"""
import hashlib
import json
import http.server
import socketserver
import sys
import time


def blob_chunk(index):
    return hashlib.sha256(index.to_bytes(8, "big")).digest() * 2048  # 64 KiB


def blob(n):
    i = 0
    while n > 0:
        chunk = blob_chunk(i)[:n]
        yield chunk
        n -= len(chunk)
        i += 1


def blob_sha256(n):
    h = hashlib.sha256()
    for chunk in blob(n):
        h.update(chunk)
    return h.hexdigest()


def read_chunked(handler, digest):
    """Reads a chunked body (RFC 9112 §7.1) into digest; its trailers are read and dropped."""
    while True:
        size = int(handler.rfile.readline(1024).split(b";")[0].strip(), 16)
        if size == 0:
            break
        digest.update(handler.rfile.read(size))
        assert handler.rfile.read(2) == b"\r\n", "chunk not followed by CRLF"
    while handler.rfile.readline(1024) not in (b"\r\n", b""):
        pass


def answer_sha256(handler):
    """Answers a POST with the SHA-256 hex of its body, framed by Content-Length or chunked (also the kubelet
    stand-in's /sha256)."""
    digest = hashlib.sha256()
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        read_chunked(handler, digest)
        remaining = 0
    else:
        remaining = int(handler.headers.get("Content-Length", "0"))
    while remaining > 0:
        data = handler.rfile.read(min(remaining, 1 << 20))
        if not data:
            break
        digest.update(data)
        remaining -= len(data)
    body = (digest.hexdigest() + "\n").encode()
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/blob/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            for chunk in blob(n):
                self.wfile.write(chunk)
        elif self.path == "/infinite":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            chunk = blob_chunk(0)
            try:
                while True:
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return
        elif self.path.startswith("/follow/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(n):
                line = f"line {i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                time.sleep(0.05)
            self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/headers"):
            # The request line and headers as received, for proxy tests.
            body = json.dumps({"requestline": self.requestline,
                               "headers": [[k, v] for k, v in self.headers.items()]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            body = b"hello from the edge\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def do_POST(self):
        answer_sha256(self)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    Server((host, port), Handler).serve_forever()
