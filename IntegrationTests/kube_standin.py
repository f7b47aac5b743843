"""A stand-in for the Kubernetes API server, serving exactly what EdgeTunnel's client uses (there is no
kube-apiserver on these machines): `coordination.k8s.io/v1` Leases, `v1` Services, ConfigMaps and (cluster-scoped) Nodes — list (label selector
`k=v`, field selector `metadata.name=N`), watch from a resourceVersion (chunked JSON lines, ERROR/410 for a
compacted version), get, create, update, merge-patch, delete — with the JSON shapes of the API reference. A create of an existing name gets 409 AlreadyExists, an update with a
stale resourceVersion 409 Conflict, as the API server's optimistic concurrency does.

Run: python3 kube_standin.py DIR PORT [BIND [EXTRA_IP,...]]   (BIND default 127.0.0.1; the certificate names
     127.0.0.1 and the EXTRA_IPs)
  DIR/ca.crt              the CA of its serving certificate, for the kubeconfig; it appears (whole, by rename)
                          only once the port listens, so a test that waits for it can call at once
  DIR/token               the bearer token it accepts, re-read per request: rewrite it to rotate; whoever holds
                          it is the server's ServiceAccount (the user named in DIR/rbac.json)
  DIR/admin-token         if present, a token that is a cluster admin (system:masters, as kubectl's user is):
                          no RBAC, no DIR/deny
  DIR/rbac.json           if present (re-read per request), RBAC as kube-apiserver's authorizer does it for the
                          ServiceAccount: {"serviceAccount": {"namespace": NS, "name": NAME}, "objects": [the Roles,
                          ClusterRoles, RoleBindings and ClusterRoleBindings, as the manifests render them]}. A request
                          is allowed if a RoleBinding in its namespace or a ClusterRoleBinding naming the ServiceAccount
                          (or its groups) refers to a Role or ClusterRole with a rule matching its verb (get, list,
                          watch, create, update, patch, delete, deletecollection: watch is a GET with watch=true, list
                          a GET of a collection), API group, resource and name (resourceNames); else 403 Forbidden
                          with the API server's Status and message ('leases.coordination.k8s.io "x" is forbidden:
                          User "system:serviceaccount:NS:NAME" cannot update resource "leases" in API group
                          "coordination.k8s.io" in the namespace "kube-system"').
  DIR/rbac.log            one JSON line per request of the ServiceAccount that RBAC (or DIR/deny) judged: allowed,
                          verb, group, resource, namespace, name, source ("rbac" or "deny")
  DIR/deny                if present, every request of the ServiceAccount gets 403 Forbidden (RBAC says no), as a
                          Status object with the API server's message for that request
  DIR/compact             if present, it is deleted and every resourceVersion so far is compacted away
  DIR/slow-writes         if present, a create or update is stored at once but answered that many seconds later
                          (an API server slow to acknowledge a write that has already happened)
  DIR/max-page            if present, a list gives at most that many items a page (with `continue`)
  DIR/expire-continue     if present, it is deleted and the next page asked for with a continue token gets 410
  DIR/watch-error         if present, every watch started gets one ERROR event with that code (500 if empty), as
                          for an etcd timeout, and ends
  DIR/requests.log        one line per request: method, path, status
  DIR/timeline.log        one line per request: wall-clock time, method, path, status, the Retry-After sent (or -)
                          and the token used (current, previous or -)

As kube-apiserver does (the API reference and k8s.io/apimachinery and apiserver are the authority):
  - Failures. DIR/fail holding "CODE [SECONDS]": every request gets CODE (429 TooManyRequests, 500 InternalError,
    or ServerTimeout with SECONDS, 503 ServiceUnavailable, 504 Timeout) with a Status; with SECONDS, the Status's
    details.retryAfterSeconds and the Retry-After header, as the API server writes them.
  - Watches. allowWatchBookmarks=true gets BOOKMARK events carrying only the object's kind and
    metadata.resourceVersion, every 60 s (DIR/bookmark-seconds: that many) and 2 s before timeoutSeconds, as the
    watch cache sends them. An object that stops matching a label selector is sent as DELETED (its last matching
    content, at the new version), one that starts to match as ADDED. resourceVersion 0 or unset starts with the
    current objects as ADDED and never gets 410; a version newer than the newest gets, after 3 s, an ERROR event
    504 Timeout "Too large resource version" with the cause ResourceVersionTooLarge (a list: that answer).
  - Validation. A Lease's acquireTime and renewTime must be MicroTime (RFC 3339 with exactly six fractional
    digits) or the body does not decode: 400 BadRequest, as for any body that does not decode. An object that
    decodes but fails validation (no name, a name or label that is no DNS name, leaseDurationSeconds < 1, a
    ConfigMap key that is not one) gets 422 Invalid with the Status's causes; a namespace or name in the body other
    than the URL's gets 400.
  - Watches end cleanly (the chunked body's last chunk) after their timeoutSeconds, as the API server ends them
    (30 s if none is given; the API server then takes a random 1-2x --min-request-timeout). DIR/watch-seconds: every
    watch ends after that many seconds at most, as a proxy or load balancer in front of the API server may end it
    sooner.
  - Watches cut mid-stream. DIR/watch-cut holding "MODE RESOURCE" (MODE reset or end): the next watch of RESOURCE
    that has an event to send is cut instead of sending it (the file is then deleted), after the events it has sent:
    reset closes the connection with a TCP RST (SO_LINGER 0), as a node or a proxy that goes away does; end ends the
    body cleanly, as timeoutSeconds does. The event is not lost: it is sent again to a watch from an earlier version.
    "MODE RESOURCE at-once": every watch of RESOURCE is cut 0.2 s after its headers (before any event), as long as
    the file exists (a proxy that drops every watch). DIR/events.log gets "RESET|END RESOURCE - VERSION", the last version the cut watch
    sent (or the one it started from); a watch ended by its timeout, "TIMEOUT RESOURCE - VERSION" likewise.
  - Pagination. DIR/empty-page: the first page of each list holds no item but a continue token (as a list with a
    label selector may).
  - Token rotation as projected service-account tokens: when DIR/token changes, the previous token stays valid
    until it expires, DIR/old-token-seconds from the change (60 if absent). DIR/reject-once holding N: the next N
    requests get 401 whatever their token (a token that expired just as it was checked).

Its parts: kube_standin_state.py (command line, the store, the serving certificate), kube_standin_rules.py (Status
bodies, validation, selectors, merge-patch, RBAC) and kube_standin_watch.py (the watch).
"""
import base64
import http.server
import json
import socket
import socketserver
import ssl
import struct
import time
import urllib.parse

from kube_standin_rules import (
    failure, forbidden, matches, merge, rbac_allows, rbac_user, status, too_large, validate)
from kube_standin_state import (
    BIND, DIR, KINDS, PORT, PREFIXES, flag, lock, publish, serving_certificate, state, tokens)
from kube_standin_watch import WatchMixin


class Handler(WatchMixin, http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    auth = "-"

    def reply(self, code, body, retry_after=None):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.end_headers()
        self.wfile.write(data)
        with open(DIR / "requests.log", "a") as log:
            log.write(f"{self.command} {self.path} {code}\n")
        self.timeline(self.command, code, retry_after)

    def timeline(self, method, code, retry_after=None):
        with open(DIR / "timeline.log", "a") as log:
            log.write(f"{time.time():.3f} {method} {self.path} {code} {'-' if retry_after is None else retry_after} "
                      f"{self.auth}\n")

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
        if self.authenticate() is None:
            self.reply(401, status(401, "Unauthorized", "Unauthorized"))
            return False
        fail = flag("fail")
        if fail:
            code, _, seconds = fail.partition(" ")
            body, retry_after = failure(int(code), int(seconds) if seconds.strip() else None)
            self.reply(int(code), body, retry_after)
            return False
        if self.auth != "admin":
            refusal = self.authorize()
            if refusal:
                self.reply(403, refusal)
                return False
        return True

    def attributes(self):
        """The request as the authorizer sees it (apiserver's RequestInfo): verb, API group, resource, namespace,
        name; None for a path that is no resource served here."""
        resource, namespace, name, query = self.route()
        if resource is None:
            return None
        group = KINDS[resource][1].rpartition("/")[0]
        if self.command == "GET" and not name:
            verb = "watch" if query.get("watch", ["false"])[0].lower() in ("1", "t", "true") else "list"
            field = query.get("fieldSelector", [""])[0]
            if field.startswith("metadata.name=") and "," not in field:  # RequiresExactMatch("metadata.name")
                name = field.partition("=")[2]
        else:
            verb = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch",
                    "DELETE": "delete" if name else "deletecollection"}[self.command]
        if self.command == "POST":
            name = None  # a create names its object in the body, not in what is authorized
        return verb, group, resource, namespace, name or ""

    def authorize(self):
        """None if the ServiceAccount may make this request (DIR/rbac.json, DIR/deny), else the 403 Status."""
        deny, rbac = (DIR / "deny").exists(), rbac_user()
        attributes = self.attributes()
        if attributes is None or not (deny or rbac):
            return None
        verb, group, resource, namespace, name = attributes
        user = rbac[0] if rbac else "system:serviceaccount:kube-system:edge-tunnel-server"
        allowed = not deny and rbac_allows(rbac[2], user, rbac[1], *attributes)
        with open(DIR / "rbac.log", "a") as log:
            log.write(json.dumps({"allowed": allowed, "verb": verb, "group": group, "resource": resource,
                                  "namespace": namespace, "name": name, "source": "deny" if deny else "rbac"}) + "\n")
        return None if allowed else forbidden(user, *attributes)

    def authenticate(self):
        """The token the request carries, if the API server takes it: the one in DIR/token, or an earlier one that
        has not expired yet (a projected token stays valid until its expiry after the kubelet wrote a new one)."""
        current = (DIR / "token").read_text().strip()
        now = time.monotonic()
        with lock:
            if tokens["current"] not in (None, current):
                tokens["previous"][tokens["current"]] = now + float(flag("old-token-seconds", "60"))
            tokens["current"] = current
            tokens["previous"].pop(current, None)
            reject = flag("reject-once")
            if reject is not None:
                left = int(reject or "1") - 1
                if left > 0:
                    (DIR / "reject-once").write_text(str(left))
                else:
                    (DIR / "reject-once").unlink()
                return None
        offered = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        admin = flag("admin-token")
        if admin and offered == admin:
            self.auth = "admin"
        elif offered == current:
            self.auth = "current"
        elif tokens["previous"].get(offered, 0) > now:
            self.auth = "previous"
        else:
            return None
        return offered

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

    def record(self, resource, kind, obj, previous=None):
        """Stores an event; `previous` is the object as it was before a MODIFIED (a watch whose selector it no
        longer matches gets DELETED)."""
        state["rv"] += 1
        obj["metadata"]["resourceVersion"] = str(state["rv"])
        state["events"].append((state["rv"], resource, kind, json.loads(json.dumps(obj)), previous))
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
                              int(query.get("timeoutSeconds", ["30"])[0]),
                              query.get("allowWatchBookmarks", ["false"])[0] == "true")
        wanted = int(query.get("resourceVersion", ["0"])[0] or 0)
        if wanted and not self.fresh(wanted):
            body = too_large(wanted)
            return self.reply(504, body, body["details"]["retryAfterSeconds"])
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
        if snapshot is None and (DIR / "empty-page").exists() and limit:
            # A page with no item that is not the last (the API server filters a label selector after it reads a
            # page from etcd): the client must follow the continue token, not take the list as empty.
            token = base64.b64encode(json.dumps({"rv": rv, "after": ""}).encode()).decode()
            return self.reply(200, {"kind": "List", "apiVersion": "v1", "metadata": {**metadata, "continue": token},
                                    "items": []})
        if limit and len(items) > limit:
            items = items[:limit]
            metadata["continue"] = base64.b64encode(json.dumps({"rv": rv, "after": items[-1]["metadata"]["name"]}).encode()).decode()
        self.reply(200, {"kind": "List", "apiVersion": "v1", "metadata": metadata, "items": items})

    def fresh(self, version):
        """Whether `version` is no newer than the newest, waiting up to 3 s for it (the watch cache's wait)."""
        deadline = time.monotonic() + 3
        with lock:
            while state["rv"] < version and time.monotonic() < deadline:
                lock.wait(0.2)
            return state["rv"] >= version

    def reset(self):
        """Closes the connection with a TCP RST (SO_LINGER 0), no TLS close_notify: the peer reads ECONNRESET."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the makefile() reader holds the socket open: the close below must be the last one
        self.connection.close()

    def do_POST(self):
        if not self.check():
            return
        resource, namespace, _, _ = self.route()
        obj = self.body()
        refused = validate(resource, namespace, None, obj)
        if refused:
            return self.reply(*refused)
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
        refused = validate(resource, namespace, name, obj)
        if refused:
            return self.reply(*refused)
        with lock:
            current = state["objects"].get((resource, namespace, name))
            if current is None:
                return self.reply(404, status(404, "NotFound", "not found"))
            # Without a resourceVersion the update is unconditional (Leases, ConfigMaps, Services and Nodes allow it).
            if obj["metadata"].get("resourceVersion") not in (None, "", current["metadata"]["resourceVersion"]):
                return self.reply(409, status(409, "Conflict", "the object has been modified"))
            if namespace:
                obj["metadata"]["namespace"] = namespace
            state["objects"][(resource, namespace, name)] = obj
            self.record(resource, "MODIFIED", obj, previous=current)
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
            patched = json.loads(json.dumps(current))
            merge(patched, patch)
            refused = validate(resource, namespace, name, patched)
            if refused:
                return self.reply(*refused)
            state["objects"][(resource, namespace, name)] = patched
            self.record(resource, "MODIFIED", patched, previous=current)
        self.reply(200, patched)

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
