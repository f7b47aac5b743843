"""An HTTP service standing in for an edge node's kubelet or app, for the end-to-end tests.

GET /blob/N        N deterministic bytes that never repeat (streamed): a chunk delivered twice, dropped or
                   misplaced changes the SHA-256 (`blob_sha256`)
GET /infinite      an endless stream of bytes (for stalled-reader tests)
GET /follow/N      N lines, chunked, one every 50 ms (like `kubectl logs -f`)
POST /sha256       answers the SHA-256 hex of the request body; a body that ends before its length (or its
                   last chunk) is an error: 400, never the hash of what came
GET /headers       the request line and headers as received (JSON)
GET /hello         a short greeting

A transfer that ends early prints one line to stdout (the process's log), for tests that check how a stream was
ended on the edge side: `EDGE <request>: <what> after <n> of <m> bytes: <how>`, where <how> is `EOF` (the peer
closed cleanly) or the exception's name (`ConnectionResetError`: the peer reset the connection).
"""
import functools
import hashlib
import json
import http.server
import socketserver
import sys
import time

CHUNK = 64 * 1024
# A pseudo-random 64 KiB number R (SHAKE-256 output). Chunk i of a blob is R * (2i + 1) mod 2^(8 * CHUNK), little
# endian: random-looking within the chunk (no period; the old blob repeated every 32 bytes), and different for
# every i (an odd factor is invertible), at several hundred MB/s in pure Python.
_BLOB_BASE = int.from_bytes(hashlib.shake_256(b"edge-service blob").digest(CHUNK), "little")
_BLOB_MASK = (1 << (8 * CHUNK)) - 1


def event(text):
    """One line in this service's log (stdout), at once."""
    print(f"EDGE {text}", flush=True)


def blob_chunk(index):
    return ((_BLOB_BASE * (2 * index + 1)) & _BLOB_MASK).to_bytes(CHUNK, "little")


def blob(n):
    i = 0
    while n > 0:
        chunk = blob_chunk(i)[:n]
        yield chunk
        n -= len(chunk)
        i += 1


@functools.lru_cache(maxsize=64)
def blob_sha256(n):
    h = hashlib.sha256()
    for chunk in blob(n):
        h.update(chunk)
    return h.hexdigest()


class ShortBody(Exception):
    """The request body ended before its framing said it would: `how` is "EOF" or the exception's name."""

    def __init__(self, got, expected, how):
        super().__init__(f"the body ended after {got} of {expected} bytes: {how}")
        self.how = how


def read_chunked(handler, digest):
    """Reads a chunked body (RFC 9112 §7.1) into digest; its trailers are read and dropped. Returns its length;
    raises ShortBody when the connection ends before the last chunk."""
    total = 0
    while True:
        line = handler.rfile.readline(1024)
        if not line.endswith(b"\n"):
            raise ShortBody(total, "a chunked", "EOF")
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            break
        data = handler.rfile.read(size)
        digest.update(data)
        total += len(data)
        if len(data) < size or handler.rfile.read(2) != b"\r\n":
            raise ShortBody(total, "a chunked", "EOF")
    while handler.rfile.readline(1024) not in (b"\r\n", b""):
        pass
    return total


def answer_sha256(handler):
    """Answers a POST with the SHA-256 hex of its body, framed by Content-Length or chunked (also the kubelet
    stand-in's /sha256). A body cut short (EOF or a reset before its end) is never hashed as if whole: the event is
    logged and the answer, if the caller still reads, is 400."""
    digest = hashlib.sha256()
    expected = None
    try:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            read_chunked(handler, digest)
        else:
            expected = int(handler.headers.get("Content-Length", "0"))
            got = 0
            while got < expected:
                try:
                    data = handler.rfile.read1(min(expected - got, 1 << 20))  # what came, counted as it comes
                except OSError as error:
                    raise ShortBody(got, expected, type(error).__name__) from error
                if not data:
                    raise ShortBody(got, expected, "EOF")
                digest.update(data)
                got += len(data)
    except ShortBody as short:
        event(f"{handler.command} {handler.path}: {short}")
        handler.close_connection = True
        body = f"{short}\n".encode()
        try:
            handler.send_response(400)
            handler.send_header("Content-Length", str(len(body)))
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(body)
        except OSError:
            pass  # the caller is gone: the log line is the record
        return
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
            sent = 0
            try:
                for chunk in blob(n):
                    self.wfile.write(chunk)
                    sent += len(chunk)
            except OSError as error:
                event(f"GET {self.path}: sending ended after {sent} of {n} bytes: {type(error).__name__}")
                self.close_connection = True
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
            try:
                for i in range(n):
                    line = f"line {i}\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                    time.sleep(0.05)
                self.wfile.write(b"0\r\n\r\n")
            except OSError as error:
                event(f"GET {self.path}: sending ended after {i} of {n} lines: {type(error).__name__}")
                self.close_connection = True
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
