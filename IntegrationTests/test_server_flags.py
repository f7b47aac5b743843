"""The server's flags and config keys: a bad value stops the server at start with one line naming it, and
changes nothing in the PKI folder. (The CLI's own bad input is in test_pki_cli.py and test_plan.py.)"""
import pytest

from conftest import BIN, assert_one_line_error, run, snapshot

BAD_SERVER_FLAGS = [
    # A server ID is read by agents in a line before TLS and names the replica's Lease: a pod name, no space.
    (["--server-id", "replica 1"], ["--server-id", "replica 1"]),
    (["--server-id", "r" * 254], ["--server-id"]),
    (["--server-count", "0"], ["--server-count", "1-1000"]),
    (["--join-state-namespace", "Bad_NS"], ["--join-state-namespace", "Bad_NS"]),
    (["--join-state-namespace", "a.b"], ["--join-state-namespace", "a.b"]),
    (["--lease-label", "x"], ["--lease-label", "key=value"]),
    (["--address-service", "svc"], ["--address-service", "namespace/name"]),
    (["--replica-warmup", "2h"], ["--replica-warmup"]),
    (["--ca-dir", "/nonexistent-ca"], ["/nonexistent-ca/ca.crt", "does not exist"]),
    (["--resume-grace-seconds", "601"], ["--resume-grace-seconds", "601", "between 0 and 600"]),
    (["--resume-grace-seconds=-1"], ["--resume-grace-seconds", "-1"]),
]


@pytest.mark.parametrize("flags,needles", BAD_SERVER_FLAGS, ids=lambda v: " ".join(v)[:40] if isinstance(v, list) else None)
def test_a_bad_server_flag_is_one_line_and_changes_nothing(tmp_path, edgetunnel, flags, needles):
    pki = tmp_path / "pki"
    edgetunnel("pki", "init", "--pki-dir", pki)
    before = snapshot(pki)
    result = run(BIN / "edge-tunnel-server", "--pki-dir", pki, "--bind-address", "127.0.0.1", "--tunnel-port", "0",
                 "--secure-port", "0", "--meta-port", "0", *flags, check=False, timeout=20)
    assert_one_line_error(result, *needles)
    assert snapshot(pki) == before


def test_the_same_bad_value_in_the_config_file_is_refused_alike(tmp_path, edgetunnel):
    pki = tmp_path / "pki"
    edgetunnel("pki", "init", "--pki-dir", pki)
    config = tmp_path / "server.yaml"
    config.write_text("serverID: 'replica 1'\n")
    result = run(BIN / "edge-tunnel-server", "--pki-dir", pki, "--config", config, check=False, timeout=20)
    assert_one_line_error(result, "replica 1")


def test_the_cli_refuses_a_bad_join_state_namespace_before_any_request(edgetunnel):
    for command in (["token", "create"], ["token", "list"], ["node", "list"], ["node", "revoke", "edge-1"]):
        result = edgetunnel(*command, "--join-state-namespace", "Bad_NS", check=False)
        assert_one_line_error(result, "--join-state-namespace", "Bad_NS")


@pytest.mark.parametrize("command,needles", [
    (["routes", "dns", "--tunnel-address", "nope"], ["--tunnel-address", "nope"]),
    (["routes", "iptables", "--tunnel-address", "10.0.0.300"], ["--tunnel-address", "10.0.0.300"]),
    (["status", "--server", "nope"], ["--server", "nope"]),
    (["forward", "--server", "127.0.0.1", "--to", "edge-1:10250"], ["--server", "127.0.0.1"]),
    (["forward", "--server", "unix:/tmp/x.sock", "--to", "edge-1"], ["--to", "edge-1"]),
])
def test_the_clients_refuse_a_bad_address_in_one_line(edgetunnel, command, needles):
    assert_one_line_error(edgetunnel(*command, check=False), "edgetunnel: error:", *needles)
