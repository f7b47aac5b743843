"""A stand-in for the Kubernetes API server, serving exactly what EdgeTunnel's client uses (there is no
kube-apiserver on these machines): `coordination.k8s.io/v1` Leases, `v1` Services, ConfigMaps and (cluster-scoped) Nodes — list (label selector
`k=v`, field selector `metadata.name=N`), watch from a resourceVersion (chunked JSON lines, ERROR/410 for a
compacted version), get, create, update, merge-patch, delete — with the JSON shapes of the API reference. A create of an existing name gets 409 AlreadyExists, an update with a
stale resourceVersion 409 Conflict, as the API server's optimistic concurrency does.

Run: python3 kube_standin.py DIR PORT [BIND [EXTRA_IP,...]]   (BIND default 127.0.0.1; the certificate names
     127.0.0.1 and the EXTRA_IPs)
  DIR/ca.crt              the CA of its serving certificate, for the kubeconfig; it appears (whole, by rename)
                          only once the port listens, so a test that waits for it can call at once
  DIR/token               the bearer token it accepts, re-read per request: rewrite it to rotate
  DIR/deny                if present, every request gets 403 Forbidden (RBAC says no), as a Status object
  DIR/compact             if present, it is deleted and every resourceVersion so far is compacted away
  DIR/slow-writes         if present, a create or update is stored at once but answered that many seconds later
                          (an API server slow to acknowledge a write that has already happened)
  DIR/max-page            if present, a list gives at most that many items a page (with `continue`)
  DIR/expire-continue     if present, it is deleted and the next page asked for with a continue token gets 410
  DIR/watch-error         if present, every watch started gets one ERROR event with that code (500 if empty), as
                          for an etcd timeout, and ends
  DIR/requests.log        one line per request: method, path, status
"""
import base64
import datetime
import http.server
import json
import os
import pathlib
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DIR = pathlib.Path(sys.argv[1])
PORT = int(sys.argv[2])
BIND = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
EXTRA_IPS = [ip for ip in (sys.argv[4] if len(sys.argv) > 4 else "").split(",") if ip]
PREFIXES = {"leases": "/apis/coordination.k8s.io/v1/namespaces/", "services": "/api/v1/namespaces/",
            "configmaps": "/api/v1/namespaces/"}

lock = threading.Condition()
state = {"rv": 100, "compacted": 0, "objects": {}, "events": [], "epoch": 0}


def serving_certificate():
    """The serving key and certificate; the certificate stays in memory until `publish` (after the bind)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-standin")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ["127.0.0.1", *EXTRA_IPS]]), critical=False)
            .sign(key, hashes.SHA256()))
    (DIR / "serving.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (DIR / "serving.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return DIR / "serving.crt", DIR / "serving.key"


def publish(cert):
    """ca.crt, written then renamed: whoever sees it may connect, and never reads half a PEM."""
    partial = DIR / "ca.crt.partial"
    partial.write_bytes(cert.read_bytes())
    os.replace(partial, DIR / "ca.crt")


def status(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def matches(obj, labels, fields):
    if labels:
        key, _, value = labels.partition("=")
        if obj["metadata"].get("labels", {}).get(key) != value:
            return False
    if fields:
        key, _, value = fields.partition("=")
        if key != "metadata.name" or obj["metadata"]["name"] != value:
            return False
    return True


def merge(target, patch):
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = value


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        with open(DIR / "requests.log", "a") as log:
            log.write(f"{self.command} {self.path} {code}\n")

    def slow_write(self):
        try:  # the test removes the file when it is done with it
            time.sleep(float((DIR / "slow-writes").read_text() or "0"))
        except FileNotFoundError:
            pass

    def check(self):
        """Authentication and RBAC as the API server does them: 401 without the current token, 403 if denied."""
        if (DIR / "compact").exists():
            (DIR / "compact").unlink()
            with lock:  # every version so far is gone; open watches end with 410, as after an etcd compaction
                state["compacted"] = state["rv"]
                state["events"] = []
                state["epoch"] += 1
                lock.notify_all()
        token = (DIR / "token").read_text().strip()
        if self.headers.get("Authorization") != f"Bearer {token}":
            self.reply(401, status(401, "Unauthorized", "Unauthorized"))
            return False
        if (DIR / "deny").exists():
            self.reply(403, status(403, "Forbidden", 'leases.coordination.k8s.io is forbidden: User '
                                   '"system:serviceaccount:kube-system:edge-tunnel-server" cannot list resource '
                                   '"leases" in API group "coordination.k8s.io" in the namespace "kube-system"'))
            return False
        return True

    def route(self):
        """(resource, namespace, name or None, query) for the endpoints served; resource None otherwise."""
        url = urllib.parse.urlparse(self.path)
        if url.path == "/api/v1/nodes" or url.path.startswith("/api/v1/nodes/"):  # cluster-scoped
            rest = url.path[len("/api/v1/nodes"):].strip("/")
            return "nodes", "", (rest or None), urllib.parse.parse_qs(url.query)
        for resource, prefix in PREFIXES.items():
            if url.path.startswith(prefix):
                rest = url.path[len(prefix):].split("/")
                if len(rest) >= 2 and rest[1] == resource:
                    return resource, rest[0], (rest[2] if len(rest) > 2 else None), urllib.parse.parse_qs(url.query)
        return None, None, None, None

    def body(self):
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def record(self, resource, kind, obj):
        state["rv"] += 1
        obj["metadata"]["resourceVersion"] = str(state["rv"])
        state["events"].append((state["rv"], resource, kind, json.loads(json.dumps(obj))))
        lock.notify_all()

    def do_GET(self):
        if not self.check():
            return
        resource, namespace, name, query = self.route()
        if resource is None:
            return self.reply(404, status(404, "NotFound", "the server could not find the requested resource"))
        labels, fields = query.get("labelSelector", [""])[0], query.get("fieldSelector", [""])[0]
        if name:
            with lock:
                obj = state["objects"].get((resource, namespace, name))
            if obj is None:
                return self.reply(404, status(404, "NotFound", f'{resource} "{name}" not found'))
            return self.reply(200, obj)
        if query.get("watch", ["0"])[0] in ("1", "true"):
            return self.watch(resource, namespace, labels, fields, int(query.get("resourceVersion", ["0"])[0] or 0),
                              int(query.get("timeoutSeconds", ["30"])[0]))
        # Pages as the API server gives them: `limit` items at most (fewer when DIR/max-page says so, as a
        # server may), in name order, with a `continue` token naming the snapshot and the last name given.
        limit = int(query.get("limit", ["0"])[0] or 0)
        cap = DIR / "max-page"
        if cap.exists():
            limit = min(limit, int(cap.read_text())) if limit else int(cap.read_text())
        after, snapshot = "", None
        if "continue" in query:
            try:
                token = json.loads(base64.b64decode(query["continue"][0]))
                after, snapshot = token["after"], token["rv"]
            except (ValueError, KeyError, TypeError):
                return self.reply(400, status(400, "BadRequest", "invalid continue token"))
        expire = DIR / "expire-continue"
        if snapshot is not None and expire.exists():
            expire.unlink()
            return self.reply(410, status(410, "Expired", "The provided continue parameter is too old to display a "
                                          "consistent list result. You can start a new list without the continue parameter."))
        with lock:
            items = sorted((o for (r, ns, _), o in state["objects"].items()
                            if r == resource and ns == namespace and matches(o, labels, fields)),
                           key=lambda o: o["metadata"]["name"])
            rv = state["rv"] if snapshot is None else snapshot
        items = [o for o in items if o["metadata"]["name"] > after]
        metadata = {"resourceVersion": str(rv)}
        if limit and len(items) > limit:
            items = items[:limit]
            metadata["continue"] = base64.b64encode(json.dumps({"rv": rv, "after": items[-1]["metadata"]["name"]}).encode()).decode()
        self.reply(200, {"kind": "List", "apiVersion": "v1", "metadata": metadata, "items": items})

    def watch(self, resource, namespace, labels, fields, since, timeout):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with open(DIR / "requests.log", "a") as log:
            log.write(f"WATCH {self.path} 200\n")

        def send(event):
            data = (json.dumps(event) + "\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        deadline = time.monotonic() + timeout
        try:
            try:  # the test removes the file when it is done with it
                code = int((DIR / "watch-error").read_text() or "500")
            except FileNotFoundError:
                code = None
            if code is not None:
                send({"type": "ERROR", "object": status(code, "InternalError", "etcdserver: request timed out")})
                self.wfile.write(b"0\r\n\r\n")
                return
            with lock:
                epoch = state["epoch"]
                if since < state["compacted"]:
                    send({"type": "ERROR", "object": status(410, "Expired", f"too old resource version: {since}")})
                    self.wfile.write(b"0\r\n\r\n")
                    return
            while time.monotonic() < deadline:
                with lock:
                    pending = [e for e in state["events"] if e[0] > since]
                    if not pending:
                        lock.wait(0.5)
                        if since < state["compacted"] or state["epoch"] != epoch:
                            send({"type": "ERROR", "object": status(410, "Expired", "too old resource version")})
                            break
                        continue
                for rv, r, kind, obj in pending:
                    since = rv
                    if r == resource and obj["metadata"].get("namespace", "") == namespace and matches(obj, labels, fields):
                        send({"type": kind, "object": obj})
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self):
        if not self.check():
            return
        resource, namespace, _, _ = self.route()
        obj = self.body()
        key = (resource, namespace, obj["metadata"]["name"])
        with lock:
            if key in state["objects"]:
                return self.reply(409, status(409, "AlreadyExists", "already exists"))
            if namespace:
                obj["metadata"]["namespace"] = namespace
            state["objects"][key] = obj
            self.record(resource, "ADDED", obj)
        self.slow_write()
        self.reply(201, obj)

    def do_PUT(self):
        if not self.check():
            return
        resource, namespace, name, _ = self.route()
        obj = self.body()
        with lock:
            current = state["objects"].get((resource, namespace, name))
            if current is None:
                return self.reply(404, status(404, "NotFound", "not found"))
            if obj["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                return self.reply(409, status(409, "Conflict", "the object has been modified"))
            state["objects"][(resource, namespace, name)] = obj
            self.record(resource, "MODIFIED", obj)
        self.slow_write()
        self.reply(200, obj)

    def do_PATCH(self):
        if not self.check():
            return
        resource, namespace, name, _ = self.route()
        patch = self.body()
        with lock:
            current = state["objects"].get((resource, namespace, name))
            if current is None:
                return self.reply(404, status(404, "NotFound", "not found"))
            merge(current, patch)
            self.record(resource, "MODIFIED", current)
        self.reply(200, current)

    def do_DELETE(self):
        if not self.check():
            return
        resource, namespace, name, _ = self.route()
        # DeleteOptions' preconditions, as the API server checks them: 409 when the object changed since.
        wanted = (self.body() if int(self.headers.get("Content-Length", "0")) else {}).get("preconditions", {})
        with lock:
            current = state["objects"].get((resource, namespace, name))
            if current is not None and "resourceVersion" in wanted \
                    and current["metadata"]["resourceVersion"] != wanted["resourceVersion"]:
                return self.reply(409, status(409, "Conflict", "Precondition failed: ResourceVersion in precondition: "
                                              f"{wanted['resourceVersion']}, ResourceVersion in object meta: "
                                              f"{current['metadata']['resourceVersion']}"))
            obj = state["objects"].pop((resource, namespace, name), None)
            if obj is not None:
                self.record(resource, "DELETED", obj)
        self.reply(200 if obj else 404, status(200, "", "deleted") if obj else status(404, "NotFound", "not found"))


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    cert, key = serving_certificate()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server = Server((BIND, PORT), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    publish(cert)  # the socket listens (HTTPServer binds and listens in its constructor)
    server.serve_forever()
