"""The fixtures of the test_tunnel_* modules (a module that uses them imports them): `cluster`, a server on
loopback, and `edge`, an edge service and an agent edge-1 allowed to reach it."""
import pytest

from support.harness import Cluster


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_server()
        yield c
    finally:  # also when the set-up failed: no process outlives the test
        c.close()


@pytest.fixture
def edge(cluster):
    """An edge service and an agent `edge-1` allowed to reach it."""
    port = cluster.start_edge_service()
    cluster.agent = cluster.start_agent("edge-1", "--allow", f"127.0.0.1:{port}")
    return port
