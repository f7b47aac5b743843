"""A konnectivity-protocol client for the gRPC frontend's tests, on the real gRPC stack (grpcio).

The stubs are generated at import time from the repository's own Protos/konnectivity.proto by grpcio-tools, the
file the server's Swift code was generated from; nothing here writes HTTP/2 or protobuf by hand.

`Proxy` is one Proxy RPC (a bidirectional stream of Packets) on a grpc channel: packets go out through a queue, and
a thread files what comes back by kind: DIAL_RSPs by random, DATA and CLOSE_RSPs by connectID. `Connection` is one
connectID on it, with a socket-like send / recv / close.
"""
import importlib
import pathlib
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time

import grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
_STUBS = tempfile.mkdtemp(prefix="edgetunnel-grpc-stubs-")
subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ROOT / "Protos", f"--python_out={_STUBS}",
                f"--grpc_python_out={_STUBS}", ROOT / "Protos" / "konnectivity.proto"], check=True)
sys.path.insert(0, _STUBS)
pb = importlib.import_module("konnectivity_pb2")
pb_grpc = importlib.import_module("konnectivity_pb2_grpc")
sys.path.remove(_STUBS)

_END = object()


def channel(path):
    """A grpc channel to the server's --grpc-uds-path."""
    return grpc.insecure_channel(f"unix:{path}")


def dial_request(address, random_number=None, protocol="tcp"):
    random_number = random.getrandbits(62) if random_number is None else random_number
    return pb.Packet(type=pb.DIAL_REQ, dialRequest=pb.DialRequest(protocol=protocol, address=address,
                                                                  random=random_number))


class Proxy:
    """One Proxy RPC. `ended` is set when the server ends it; `status` then holds (grpc.StatusCode, details)."""

    def __init__(self, grpc_channel, timeout=None, read=True):
        self.outgoing = queue.Queue()
        self.dial_responses = {}
        self.data = {}
        self.closes = {}
        self.other = queue.Queue()
        self.ended = threading.Event()
        self.status = None
        self.lock = threading.Condition()
        self.call = pb_grpc.ProxyServiceStub(grpc_channel).Proxy(iter(self.outgoing.get, _END), timeout=timeout)
        self.reader = threading.Thread(target=self._read, daemon=True)
        if read:
            self.reader.start()

    def start_reading(self):
        """For an RPC made with read=False: until now nothing read its responses (grpc's own buffers fill, then
        HTTP/2 flow control holds the server)."""
        self.reader.start()

    def send(self, packet):
        self.outgoing.put(packet)

    def finish(self):
        """Ends the client's side of the RPC in order."""
        self.outgoing.put(_END)

    def cancel(self):
        self.call.cancel()

    def _read(self):
        try:
            for packet in self.call:
                with self.lock:
                    if packet.type == pb.DIAL_RSP:
                        self.dial_responses[packet.dialResponse.random] = packet.dialResponse
                    elif packet.type == pb.DATA:
                        self.data.setdefault(packet.data.connectID, queue.Queue()).put(packet.data.data)
                    elif packet.type == pb.CLOSE_RSP:
                        self.closes[packet.closeResponse.connectID] = packet.closeResponse
                        self.data.setdefault(packet.closeResponse.connectID, queue.Queue()).put(None)
                    else:
                        self.other.put(packet)
                    self.lock.notify_all()
            self.status = (grpc.StatusCode.OK, "")
        except grpc.RpcError as error:
            self.status = (error.code(), error.details())
        finally:
            with self.lock:
                self.ended.set()
                self.lock.notify_all()

    def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                value = predicate()
                if value is not None:
                    return value
                if self.ended.is_set():
                    raise AssertionError(f"the RPC ended ({self.status}) while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} within {timeout} s")
                self.lock.wait(left)

    def dial_response(self, random_number, timeout=30):
        return self.wait_for(lambda: self.dial_responses.get(random_number), timeout, f"DIAL_RSP for {random_number}")

    def dial(self, address, timeout=30, random_number=None):
        """Dials `address`; returns the DialResponse (its error is set when the dial failed)."""
        request = dial_request(address, random_number)
        self.send(request)
        return self.dial_response(request.dialRequest.random, timeout)

    def connect(self, address, timeout=30):
        response = self.dial(address, timeout)
        assert not response.error and response.connectID != 0, response
        return Connection(self, response.connectID)

    def wait_ended(self, timeout=30):
        assert self.ended.wait(timeout), "the RPC did not end"
        return self.status


class Connection:
    """One connectID of a Proxy RPC."""

    def __init__(self, proxy, connect_id):
        self.proxy = proxy
        self.id = connect_id
        self.buffer = b""
        self.eof = False
        with proxy.lock:
            self.queue = proxy.data.setdefault(connect_id, queue.Queue())

    def send(self, data, chunk=32 * 1024):
        for start in range(0, len(data), chunk):
            self.proxy.send(pb.Packet(type=pb.DATA, data=pb.Data(connectID=self.id, data=data[start:start + chunk])))

    def recv(self, timeout=30):
        """The next DATA's bytes; b"" once the connectID was closed (CLOSE_RSP)."""
        if self.eof:
            return b""
        try:
            data = self.queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"connectID {self.id}: nothing within {timeout} s") from None
        if data is None:
            self.eof = True
            return b""
        return data

    def read_all(self, timeout=30):
        parts = []
        while data := self.recv(timeout):
            parts.append(data)
        return b"".join(parts)

    def close(self):
        self.proxy.send(pb.Packet(type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=self.id)))

    def close_response(self, timeout=30):
        return self.proxy.wait_for(lambda: self.proxy.closes.get(self.id), timeout, f"CLOSE_RSP for {self.id}")


def http_request(path, host="edge", method="GET", body=b""):
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def split_response(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.decode(errors="replace"), body


