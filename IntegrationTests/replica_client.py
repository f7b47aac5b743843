"""A caller for the replica tests, run inside a network namespace (`ip netns exec NS python3 replica_client.py ...`).

requests: CONNECT through PROXY to a random node's edge service, GET /hello, check the answer; repeated COUNT
          times (or until STOP_FILE exists) by THREADS threads. Prints one JSON line: ok, failures, first errors.
hold:     STREAMS CONNECT streams through PROXY reading /infinite for SECONDS; prints the bytes each stream read
          in each second, and whether it ended early.
fetch:    STREAMS CONNECT streams through PROXY, each reading /follow/LINES to its end (a line every 50 ms) and
          checking it line by line; prints, per stream, whether it came whole, the longest pause between two
          reads, and how the connection ended: "clean" (TLS close_notify), "reset" (a TCP RST), "FIN without
          close_notify: ...", or another error.
"""
import argparse
import json
import os
import random
import select
import socket
import ssl
import threading
import time


TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # tcpi_state (linux/tcp.h) once the peer's RST, or its FIN, has arrived


def tcp_state(sock):
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def tls_context(args):
    context = ssl.create_default_context(cafile=args.ca)
    context.check_hostname = False  # pod IPs are not in the serving certificate; the chain is still verified
    context.load_cert_chain(args.cert, args.key)
    return context


def connect(args, context, node, ragged_eof_is_error=False):
    host, port = args.proxy.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=10)
    tls = context.wrap_socket(raw, suppress_ragged_eofs=not ragged_eof_is_error)
    tls.sendall(f"CONNECT {node}:{args.port} HTTP/1.1\r\nHost: {node}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = tls.recv(1)
        if not chunk:
            break
        head += chunk
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if not status.startswith("HTTP/1.1 200"):
        rest = b""
        try:
            rest = tls.recv(4096)
        except OSError:
            pass
        tls.close()
        raise RuntimeError(f"{node}: {status} {rest.decode(errors='replace').strip()}")
    return tls


def one_request(args, context, node):
    tls = connect(args, context, node)
    try:
        tls.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        if not data.endswith(b"hello from the edge\n"):
            raise RuntimeError(f"{node}: unexpected answer {data[-80:]!r}")
    finally:
        tls.close()


def requests(args):
    context = tls_context(args)
    nodes = args.nodes.split(",")
    lock = threading.Lock()
    done = {"ok": 0, "failures": 0, "errors": [], "started": 0}

    def worker():
        while True:
            with lock:
                if args.count and done["started"] >= args.count:
                    return
                done["started"] += 1
            if args.stop_file and os.path.exists(args.stop_file):
                return
            node = random.choice(nodes)
            try:
                one_request(args, context, node)
                with lock:
                    done["ok"] += 1
            except Exception as error:  # reported, not raised: the test counts them
                with lock:
                    done["failures"] += 1
                    if len(done["errors"]) < 10:
                        done["errors"].append(f"{time.strftime('%H:%M:%S')} {error}")

    threads = [threading.Thread(target=worker) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({k: done[k] for k in ("ok", "failures", "errors")}), flush=True)


def print_per_stream(args, reader, results):
    """Runs `reader(i)` for each of STREAMS streams at once, then prints what they put in `results`."""
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(args.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(results), flush=True)


def hold(args):
    context = tls_context(args)
    nodes = args.nodes.split(",")
    results = [None] * args.streams

    def reader(index):
        node = nodes[index % len(nodes)]
        per_second = [0] * args.seconds
        ended = None
        try:
            tls = connect(args, context, node)
            tls.sendall(b"GET /infinite HTTP/1.1\r\nHost: x\r\n\r\n")
            tls.settimeout(5)
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < args.seconds:
                chunk = tls.recv(65536)
                if not chunk:
                    ended = f"closed after {elapsed:.1f}s"
                    break
                per_second[int(elapsed)] += len(chunk)
                time.sleep(0.002)  # a slow reader: the stream stays open, bytes keep coming
            tls.close()
        except Exception as error:
            ended = f"{error}"
        results[index] = {"node": node, "per_second": per_second, "ended": ended}

    print_per_stream(args, reader, results)


def fetch(args):
    context = tls_context(args)
    nodes = args.nodes.split(",")
    results = [None] * args.streams
    expected = b"".join(b"%x\r\n%s\r\n" % (len(line), line) for line in (f"line {i}\n".encode()
                                                                            for i in range(args.lines)))

    def reader(index):
        node = nodes[index % len(nodes)]
        body, error, longest, last, data, fin = b"", None, 0.0, None, b"", False
        try:
            tls = connect(args, context, node, ragged_eof_is_error=True)
            tls.sendall(f"GET /follow/{args.lines} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            tls.settimeout(120)
            data = b""
            last = time.monotonic()
            while True:
                # The TCP state, read before the read that sees the end: Python with OpenSSL 3 reports an RST under
                # TLS as ssl.SSLEOFError, as it does a FIN without close_notify (and answers either with an alert
                # the peer resets), so only the state seen first tells a reset from an orderly close.
                if not tls.pending():
                    if not select.select([tls], [], [], 120)[0]:
                        raise TimeoutError("nothing for 120 s")
                    state = tcp_state(tls)
                    if state == TCP_CLOSE:
                        error = "reset"
                        break
                    fin = fin or state == TCP_CLOSE_WAIT
                chunk = tls.recv(65536)
                now = time.monotonic()
                longest, last = max(longest, now - last), now
                if not chunk:
                    break
                data += chunk
            tls.close()
        except ConnectionResetError:
            error = "reset"
        except Exception as error_:  # reported: the test decides
            error = f"{'FIN without close_notify: ' if fin else ''}{type(error_).__name__}: {error_}"
        body = data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""
        whole = body == expected + b"0\r\n\r\n"
        results[index] = {"node": node, "whole": whole, "bytes": len(body), "longest_pause": round(longest, 2),
                          "end": error or "clean"}

    print_per_stream(args, reader, results)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["requests", "hold", "fetch"])
    parser.add_argument("--proxy", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--nodes", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--stop-file")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--lines", type=int, default=600)
    args = parser.parse_args()
    {"requests": requests, "hold": hold, "fetch": fetch}[args.mode](args)


if __name__ == "__main__":
    main()
