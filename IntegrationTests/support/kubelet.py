"""The kubelet stand-in (kubelet_standin.py, run by path) behind a cluster's agent: `start_kubelet_standin`."""
import pathlib
import sys

from conftest import BIN, run
from support.harness import PYTHON_HELPER_EXITS, free_port, wait_until

HERE = pathlib.Path(__file__).resolve().parents[1]  # IntegrationTests/: kubelet_standin.py runs from there by path


def start_kubelet_standin(c, tmp_path, name):
    """A kubelet stand-in on 127.0.0.1 whose serving certificate, from its own CA, names `name` and 127.0.0.1.
    Sets c.https_port, c.http_port and c.events; returns the CA file."""
    kpki = tmp_path / "kubelet-pki"
    run(BIN / "edgetunnel", "pki", "init", "--pki-dir", kpki, "--common-name", "kubelet-ca")
    run(BIN / "edgetunnel", "pki", "issue-server", "--pki-dir", kpki, "--dns", name)
    c.https_port, c.http_port = free_port(), free_port()
    c.events = tmp_path / "kubelet-events"
    c.events.write_text("")
    standin = c.spawn([sys.executable, HERE / "kubelet_standin.py", "127.0.0.1", c.https_port, c.http_port,
                       kpki / "server.crt", kpki / "server.key", c.events], "kubelet",
                       clean_exits=PYTHON_HELPER_EXITS)
    wait_until(lambda: "ready" in standin.text(), 10, "kubelet stand-in")
    return kpki / "ca.crt"
