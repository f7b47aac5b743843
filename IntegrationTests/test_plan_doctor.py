"""`edgetunnel doctor` and `probe udp` with real files, a real server and real namespaces: the server's certificate
checked against each address, the Service type per mode, UDP 8472 in the security group, a UDP probe between two
namespaces that doctor follows, and bad input. `plan` is in test_plan.py, `manifests` in test_plan_manifests.py.
"""
import json
import pathlib
import signal

from conftest import BIN, assert_one_line_error, run
from support.harness import Cluster, Proc, free_port, stop_and_check, wait_until
from netns import sh, two_hosts

HERE = pathlib.Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"


def doctor(*args, check=False):
    return run(BIN / "edgetunnel", "doctor", *args, check=check)


def test_doctor_checks_the_servers_certificate_against_each_address(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_server("--bind-address", "0.0.0.0", "--cert-ips", "127.0.0.1")
        tunnel = c.ports["tunnel"]
        ok = doctor("--server-address", f"127.0.0.1:{tunnel}", "--ca-file", c.ca)
        assert ok.returncode == 0, ok.stdout
        assert ok.stdout.startswith("PASS  tls 127.0.0.1") and "covers 127.0.0.1" in ok.stdout
        # 127.0.0.2 reaches the same server, but its certificate does not name that address.
        uncovered = doctor("--server-address", f"127.0.0.2:{tunnel}", "--ca-file", c.ca)
        assert uncovered.returncode == 1
        assert "does not cover 127.0.0.2" in uncovered.stdout and "certIPs" in uncovered.stdout
        other = tmp_path / "other"
        run(BIN / "edgetunnel", "pki", "init", "--pki-dir", other)
        wrong_ca = doctor("--server-address", f"127.0.0.1:{tunnel}", "--ca-file", other / "ca.crt")
        assert wrong_ca.returncode == 1 and "not issued by the CA" in wrong_ca.stdout
        closed = doctor("--server-address", f"127.0.0.1:{free_port()}", "--ca-file", c.ca)
        assert closed.returncode == 1 and "no TLS answer" in closed.stdout
        as_json = json.loads(doctor("--server-address", f"127.0.0.2:{tunnel}", "--ca-file", c.ca, "--output", "json").stdout)
        assert as_json[0]["status"] == "fail" and "certIPs" in as_json[0]["fix"]
    finally:
        c.close()


def test_doctor_checks_service_type_per_mode():
    lb, cip = FIXTURES / "svc-loadbalancer.yaml", FIXTURES / "svc-clusterip.yaml"
    assert doctor("--mode", "internet", "--service-file", lb).returncode == 0
    wrong = doctor("--mode", "express-connect", "--service-file", lb)
    assert wrong.returncode == 1
    assert "type LoadBalancer, but express-connect needs ClusterIP" in wrong.stdout and "kubectl" in wrong.stdout
    assert doctor("--mode", "express-connect", "--service-file", cip).returncode == 0


def test_doctor_checks_udp_8472_in_the_security_group():
    allow, drop = FIXTURES / "sg-allow.json", FIXTURES / "sg-drop.json"
    ok = doctor("--security-group-file", allow, "--edge-cidr", "192.168.10.0/24", "--edge-cidr", "192.168.20.0/24")
    assert ok.returncode == 0, ok.stdout
    bad = doctor("--security-group-file", drop, "--edge-cidr", "192.168.10.0/24", "--edge-cidr", "192.168.20.0/24")
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert lines[0].startswith("PASS") and "192.168.10.0/24" in lines[0]
    assert lines[1].startswith("FAIL") and "dropped" in lines[1] and "AuthorizeSecurityGroup" in lines[1]
    outside = doctor("--security-group-file", allow, "--edge-cidr", "10.0.0.0/8")
    assert outside.returncode == 1 and "no rule accepts" in outside.stdout


def test_doctor_bad_input(tmp_path):
    (tmp_path / "sg.json").write_text("{not json")
    for args, needle in [([], "nothing to check"), (["--server-address", "x:1"], "--ca-file"),
                         (["--service-file", FIXTURES / "svc-clusterip.yaml"], "--mode"),
                         (["--security-group-file", tmp_path / "sg.json", "--edge-cidr", "10.0.0.0/8"], "sg.json"),
                         (["--security-group-file", tmp_path / "missing.json"], "missing.json"),
                         (["--probe-udp", "nowhere"], "nowhere")]:
        result = doctor(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert_one_line_error(result, needle)


def test_udp_probe_between_two_namespaces_and_doctor_follows(tmp_path):
    with two_hosts() as (a, ip_a, b, ip_b):
        responder = Proc(["ip", "netns", "exec", b, BIN / "edgetunnel", "probe", "udp", "--listen", f"{ip_b}:8472"],
                         tmp_path / "responder.log")
        try:
            wait_until(lambda: "\n" in responder.text(), 10, "the responder's first line")
            assert "answering UDP probes" in responder.text().splitlines()[0]
            probe = sh("ip", "netns", "exec", a, BIN / "edgetunnel", "probe", "udp", "--target", f"{ip_b}:8472",
                       "--count", "5", "--timeout", "1s", "--output", "json")
            result = json.loads(probe.stdout)
            assert result["sent"] == 5 and result["received"] == 5 and result["rttMillisecondsMax"] > 0
            passing = sh("ip", "netns", "exec", a, BIN / "edgetunnel", "doctor", "--probe-udp", f"{ip_b}:8472", check=False)
            assert passing.returncode == 0 and "PASS  udp" in passing.stdout

            # The cloud host's firewall drops VXLAN: the probe and doctor's verdict follow.
            sh("ip", "netns", "exec", b, "iptables", "-w", "-A", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP")
            blocked = sh("ip", "netns", "exec", a, BIN / "edgetunnel", "probe", "udp", "--target", f"{ip_b}:8472",
                         "--count", "3", "--timeout", "1s", check=False)
            assert blocked.returncode == 1 and blocked.stdout.startswith("0/3 probes")
            failing = sh("ip", "netns", "exec", a, BIN / "edgetunnel", "doctor", "--probe-udp", f"{ip_b}:8472", check=False)
            assert failing.returncode == 1 and "FAIL  udp" in failing.stdout and "0/5 probes came back" in failing.stdout
        finally:
            # Killed on purpose (it keeps the default SIGTERM action); it must not have exited before that.
            responder.stop(signal.SIGKILL)
            stop_and_check([responder])


def test_probe_bad_input():
    for args, needle in [(["--target", "10.0.0.1"], "10.0.0.1"), ([], "exactly one"),
                         (["--listen", "127.0.0.1:1", "--target", "127.0.0.1:2"], "exactly one"),
                         (["--target", "127.0.0.1:9", "--count", "0"], "--count"),
                         (["--target", "127.0.0.1:9", "--timeout", "soon"], "--timeout")]:
        result = run(BIN / "edgetunnel", "probe", "udp", *args, check=False)
        assert result.returncode == 2, args
        assert_one_line_error(result, needle)
