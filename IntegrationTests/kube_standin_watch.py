"""The stand-in's watch (kube_standin.py): chunked JSON events from a resource version, BOOKMARKs when asked, DELETED
when an object stops matching, ERROR 410 for a compacted version, and the cuts and timeouts the tests ask for."""
import json
import ssl
import time

from kube_standin_rules import WatchCut, matches, status, too_large
from kube_standin_state import DIR, KINDS, flag, lock, state


class WatchMixin:
    """`Handler.watch`, kept apart for its length: it runs on the handler's thread and writes to its socket."""

    def watch(self, resource, namespace, labels, fields, since, timeout, bookmarks):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with open(DIR / "requests.log", "a") as log:
            log.write(f"WATCH {self.path} 200\n")
        self.timeline("WATCH", 200)
        kind, api_version = KINDS[resource]

        sent = {"version": since}  # the last version this watch sent (at first, the one it started from)

        def send(event):
            data = (json.dumps(event) + "\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            sent["version"] = event["object"]["metadata"].get("resourceVersion", sent["version"])
            if event["type"] in ("DELETED", "BOOKMARK"):
                with open(DIR / "events.log", "a") as log:
                    log.write(f"{event['type']} {resource} {event['object']['metadata'].get('name', '-')} "
                              f"{event['object']['metadata']['resourceVersion']}\n")

        def selected(obj):
            return obj is not None and obj["metadata"].get("namespace", "") == namespace and matches(obj, labels, fields)

        def cutting(at_once):
            """How DIR/watch-cut says to cut this watch now ("reset" or "end"), or None. A one-shot cut is taken by
            the first watch that comes to it (the file is deleted)."""
            words = (flag("watch-cut") or "").split()
            if len(words) < 2 or words[1] != resource or (words[2:] == ["at-once"]) != at_once:
                return None
            if not at_once:
                try:
                    (DIR / "watch-cut").unlink()
                except FileNotFoundError:  # another watch took it
                    return None
            return words[0]

        def cut(mode):
            with open(DIR / "events.log", "a") as log:
                log.write(f"{mode.upper()} {resource} - {sent['version']}\n")
            if mode == "reset":
                self.reset()
            else:  # the body's last chunk, as at timeoutSeconds
                self.wfile.write(b"0\r\n\r\n")
            raise WatchCut()

        def deliver(event):
            """Sends an event, unless DIR/watch-cut says to cut the watch instead (the event then never leaves)."""
            mode = cutting(at_once=False)
            if mode:
                cut(mode)
            send(event)

        def bookmark(version):
            """Only the kind and metadata.resourceVersion, as a typed object with nothing else set is written."""
            obj = {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": str(version),
                                                                         "creationTimestamp": None}}
            if resource == "services":
                obj.update({"spec": {}, "status": {"loadBalancer": {}}})
            send({"type": "BOOKMARK", "object": obj})

        started = time.monotonic()
        # The API server ends a watch at timeoutSeconds (or sooner: --min-request-timeout); DIR/watch-seconds: then.
        deadline = started + min(timeout, float(flag("watch-seconds", str(timeout)) or timeout))
        every = float(flag("bookmark-seconds", "60") or "60")
        # As the watch cache: every `every` seconds, and 2 s before the watch's end, whichever is sooner.
        next_bookmark = min(started + every, deadline - 2)
        try:
            mode = cutting(at_once=True)
            if mode:
                time.sleep(0.2)  # the headers have arrived: the cut is mid-answer, not a refused connection
                cut(mode)
            code = flag("watch-error")  # the test removes the file when it is done with it
            if code is not None:
                send({"type": "ERROR", "object": status(int(code or "500"), "InternalError", "etcdserver: request timed out")})
                self.wfile.write(b"0\r\n\r\n")
                return
            if since and not self.fresh(since):
                send({"type": "ERROR", "object": too_large(since)})
                self.wfile.write(b"0\r\n\r\n")
                return
            with lock:
                epoch = state["epoch"]
                if since == 0:  # "any" version: the current objects as ADDED, then what follows; never 410
                    current = sorted((o for (r, _, _), o in state["objects"].items() if r == resource and selected(o)),
                                     key=lambda o: o["metadata"]["name"])
                    since = state["rv"]
                    initial = [json.loads(json.dumps(o)) for o in current]
                elif since < state["compacted"]:
                    send({"type": "ERROR", "object": status(410, "Expired", f"too old resource version: {since}")})
                    self.wfile.write(b"0\r\n\r\n")
                    return
                else:
                    initial = []
            sent["version"] = since
            expired = False
            for obj in initial:
                deliver({"type": "ADDED", "object": obj})
            while time.monotonic() < deadline:
                with lock:
                    pending = [e for e in state["events"] if e[0] > since]
                    if not pending:
                        lock.wait(min(0.5, max(0.01, next_bookmark - time.monotonic())) if bookmarks else 0.5)
                        if since < state["compacted"] or state["epoch"] != epoch:
                            send({"type": "ERROR", "object": status(410, "Expired", "too old resource version")})
                            expired = True
                            break
                        if bookmarks and time.monotonic() >= next_bookmark:
                            since = max(since, state["rv"])  # every event up to here was seen by this watch
                            bookmark(since)
                            now = time.monotonic()
                            next_bookmark = min(now + every, deadline - 2) if now < deadline - 2 else deadline + 1
                        continue
                for rv, r, event_type, obj, previous in pending:
                    since = rv
                    if r != resource:
                        continue
                    now, before = selected(obj), selected(previous)
                    if event_type == "MODIFIED" and now and not before:
                        deliver({"type": "ADDED", "object": obj})
                    elif event_type == "MODIFIED" and before and not now:
                        # It no longer matches: DELETED with its last matching content, at the new version.
                        gone = json.loads(json.dumps(previous))
                        gone["metadata"]["resourceVersion"] = str(rv)
                        deliver({"type": "DELETED", "object": gone})
                    elif now:
                        deliver({"type": event_type, "object": obj})
            if not expired:
                with open(DIR / "events.log", "a") as log:
                    log.write(f"TIMEOUT {resource} - {sent['version']}\n")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError, WatchCut):  # the client went away
            pass
