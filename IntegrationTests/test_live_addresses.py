"""Certificates that follow the server's addresses live: no restart, no deleted files, no lost tunnel."""
import hashlib
import json
import signal
import subprocess
import time

from conftest import BIN, run
from edge_service import blob_sha256
from support.harness import Cluster, http_get, wait_until


def served_sans(port, host="127.0.0.1"):
    """The SANs of the certificate a new handshake gets."""
    out = subprocess.run(
        f"openssl s_client -connect {host}:{port} </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName",
        shell=True, capture_output=True, text=True, timeout=20).stdout
    return out


def test_adding_an_address_reissues_the_certificate_live(tmp_path):
    c = Cluster(tmp_path)
    try:
        config = tmp_path / "server.yaml"
        config.write_text("certIPs: [192.0.2.10]\n")
        c.start_server("--config", config, "--bind-address", "0.0.0.0")
        port = c.start_edge_service()
        agent = c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}")
        pid = c.server.popen.pid
        first_serial = json.loads(http_get(c.meta_url("/v1/server"))[1])["certificateSerial"]

        # A stream opened before the change: a slow 6 MiB download that runs across it.
        size = 6 * 1024 * 1024
        slow = subprocess.Popen(
            ["curl", "-sS", "--limit-rate", "1M", "--proxy-cacert", c.ca, "--proxy-cert", c.cert,
             "--proxy-key", c.key, "-p", "-x", f"https://127.0.0.1:{c.ports['secure']}",
             f"http://edge-1:{port}/blob/{size}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_until(lambda: c.agents()[0]["streams"] == 1, 10, "the stream to open")

        # The operator adds the private-line address to the config; nothing is restarted.
        config.write_text("certIPs: [192.0.2.10, 127.0.0.2]\n")
        wait_until(lambda: "127.0.0.2" in json.loads(http_get(c.meta_url("/v1/server"))[1])["certificateIPs"], 15,
                   "the new certificate")
        info = json.loads(http_get(c.meta_url("/v1/server"))[1])
        assert info["certificateSerial"] != first_serial
        assert set(info["certificateIPs"]) == {"192.0.2.10", "127.0.0.2", "127.0.0.1"}
        assert "IP Address:127.0.0.2" in served_sans(c.ports["tunnel"])
        assert "IP Address:127.0.0.2" in run("openssl", "x509", "-in", c.pki / "server.crt", "-noout", "-ext",
                                             "subjectAltName").stdout
        assert c.server.popen.pid == pid and c.server.alive()

        # An agent that dials the new address verifies the server (IP SAN) and registers.
        c.spawn([BIN / "edge-tunnel-agent", "--node-name", "edge-3", "--server-address", f"127.0.0.2:{c.ports['tunnel']}",
                 "--pki-dir", tmp_path / "agent-edge-3", "--bootstrap-token", c.token(), "--ca-cert-hash", c.ca_hash,
                 "--meta-port", "0"], "agent-edge-3")
        wait_until(lambda: any(a["nodeName"] == "edge-3" for a in c.agents()), 20, "edge-3 over 127.0.0.2")

        # The stream that was open across the change finishes intact; the first tunnel never dropped.
        out, err = slow.communicate(timeout=60)
        assert slow.returncode == 0, err
        assert hashlib.sha256(out).hexdigest() == blob_sha256(size)
        assert "tunnel to" not in agent.text()  # no reconnect logged

        # An address removed from the set is removed from the next certificate.
        config.write_text("certIPs: [127.0.0.2]\n")
        wait_until(lambda: "192.0.2.10" not in json.loads(http_get(c.meta_url("/v1/server"))[1])["certificateIPs"], 15,
                   "the address to be dropped")
        metrics = http_get(c.meta_url("/metrics"))[1]
        assert "edge_tunnel_server_certificate_expiry_timestamp_seconds" in metrics

        # A config that does not parse is rejected and the last good one stays.
        before = json.loads(http_get(c.meta_url("/v1/server"))[1])["certificateSerial"]
        config.write_text("certIPs: [127.0.0.2\n")
        wait_until(lambda: "configuration rejected" in c.server.text(), 10, "the rejection to be logged")
        config.write_text("certIPs: [300.0.0.1]\n")
        c.server.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: c.server.text().count("configuration rejected") >= 2, 10, "the second rejection")
        assert "300.0.0.1" in c.server.text()
        assert json.loads(http_get(c.meta_url("/v1/server"))[1])["certificateSerial"] == before
        assert c.curl(f"http://edge-1:{port}/hello", check=True).stdout == "hello from the edge\n"
    finally:
        c.close()


def test_sighup_applies_a_changed_file_at_once(tmp_path):
    c = Cluster(tmp_path)
    try:
        config = tmp_path / "server.yaml"
        config.write_text("certDNSNames: [tunnel-a.example.com]\n")
        c.start_server("--config", config)
        config.write_text("certDNSNames: [tunnel-b.example.com]\n")
        c.server.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: "tunnel-b.example.com" in json.loads(http_get(c.meta_url("/v1/server"))[1])["certificateDNSNames"],
                   5, "SIGHUP reload")
        c.server.expect_log("SIGHUP: configuration applied")
    finally:
        c.close()


def test_the_server_renews_its_own_certificate_at_two_thirds_of_its_life(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_server("--serving-certificate-validity", "15s")
        port = c.start_edge_service()
        c.start_agent("edge-1", "--allow", f"127.0.0.1:{port}")
        first = json.loads(http_get(c.meta_url("/v1/server"))[1])
        wait_until(lambda: json.loads(http_get(c.meta_url("/v1/server"))[1])["certificateSerial"] != first["certificateSerial"],
                   25, "the renewed serving certificate")
        renewed = json.loads(http_get(c.meta_url("/v1/server"))[1])
        assert renewed["certificateNotAfter"] > first["certificateNotAfter"]
        assert renewed["certificateIPs"] == first["certificateIPs"]
        assert c.curl(f"http://edge-1:{port}/hello", check=True).stdout == "hello from the edge\n"
        # A new agent handshake after the first certificate expired still verifies.
        time.sleep(max(0, 16 - 10))
        c.start_agent("edge-2", ips=("127.0.0.6",))
    finally:
        c.close()
