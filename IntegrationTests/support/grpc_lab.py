"""The gRPC frontend's lab for test_grpc_frontend*.py: `lab` is a server with `--grpc-uds-path`, one agent (edge-1 on
127.0.0.1) and one edge service it allows (a fixture: a test module that uses it imports it); `fetch` is an HTTP
request through a konnectivity connection, `server_metric` a line of the server's /metrics."""
import pytest

import konnectivity_client as kc
from support.harness import Cluster, http_get, metric_of


@pytest.fixture
def lab(tmp_path):
    """A server with the gRPC frontend, one agent (edge-1 on 127.0.0.1) allowing one edge service."""
    c = Cluster(tmp_path)
    c.grpc_sock = tmp_path / "konnectivity.sock"
    c.start_server("--grpc-uds-path", c.grpc_sock)
    c.edge_port = c.start_edge_service()
    c.agent = c.start_agent("edge-1", "--allow", f"127.0.0.1:{c.edge_port}")
    try:
        yield c
    finally:
        c.close()


def server_metric(c, name):
    return metric_of(http_get(c.meta_url("/metrics"))[1], name)


def fetch(connection, path, method="GET", body=b""):
    connection.send(kc.http_request(path, method=method, body=body))
    return kc.split_response(connection.read_all(timeout=60))
