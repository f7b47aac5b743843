"""`edgetunnel pki` and `edgetunnel token`, checked with the real openssl."""
import hashlib
import json
import re
import stat
import subprocess

import pytest

from conftest import BIN, assert_one_line_error, run, snapshot

SERVICE_NAMES = [
    "x-tunnel-server-svc",
    "x-tunnel-server-svc.kube-system",
    "x-tunnel-server-svc.kube-system.svc",
    "x-tunnel-server-svc.kube-system.svc.cluster.local",
]


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def x509_text(path):
    return run("openssl", "x509", "-in", path, "-noout", "-text").stdout


def san_set(path):
    out = run("openssl", "x509", "-in", path, "-noout", "-ext", "subjectAltName").stdout
    names = set()
    for item in out.split("\n", 1)[1].replace("\n", ",").split(","):
        item = item.strip()
        if item:
            kind, value = item.split(":", 1)
            names.add((kind, value))
    return names


@pytest.fixture
def pki(tmp_path, edgetunnel):
    folder = tmp_path / "pki"
    edgetunnel("pki", "init", "--pki-dir", folder)
    return folder


def test_init_creates_a_private_p256_ca_valid_ten_years(tmp_path, edgetunnel):
    folder = tmp_path / "nested" / "pki"
    out = edgetunnel("pki", "init", "--pki-dir", folder).stdout
    assert mode(folder) == 0o700
    assert mode(folder / "ca.key") == 0o600
    assert mode(folder / "ca.crt") == 0o644
    text = x509_text(folder / "ca.crt")
    assert "CA:TRUE" in text
    assert "Certificate Sign" in text
    assert "prime256v1" in text or "P-256" in text
    key = run("openssl", "pkey", "-in", folder / "ca.key", "-noout", "-text").stdout
    assert "prime256v1" in key or "P-256" in key
    enddate = run("openssl", "x509", "-in", folder / "ca.crt", "-noout", "-checkend", str(9 * 365 * 86400))
    assert enddate.returncode == 0
    assert run("openssl", "x509", "-in", folder / "ca.crt", "-noout", "-checkend", str(11 * 365 * 86400),
               check=False).returncode != 0
    assert "sha256:" in out


def test_init_refuses_to_overwrite_without_force(pki, edgetunnel):
    before = snapshot(pki)
    result = edgetunnel("pki", "init", "--pki-dir", pki, check=False)
    assert_one_line_error(result, str(pki / "ca.crt"), "--force")
    assert snapshot(pki) == before
    edgetunnel("pki", "init", "--pki-dir", pki, "--force")
    assert (pki / "ca.crt").read_bytes() != before["ca.crt"][0]


def test_issue_server_has_exact_sans_server_auth_and_days(pki, edgetunnel):
    edgetunnel("pki", "issue-server", "--pki-dir", pki, "--ip", "10.0.3.7", "--ip", "fd00::1",
               "--dns", "tunnel.example.com", "--days", "30")
    crt, key = pki / "server.crt", pki / "server.key"
    assert run("openssl", "verify", "-CAfile", pki / "ca.crt", crt).stdout.strip().endswith("OK")
    expected = {("IP Address", "10.0.3.7"), ("IP Address", "FD00:0:0:0:0:0:0:1"), ("IP Address", "127.0.0.1"),
                ("DNS", "tunnel.example.com")} | {("DNS", n) for n in SERVICE_NAMES}
    assert san_set(crt) == expected
    text = x509_text(crt)
    assert "TLS Web Server Authentication" in text
    assert "TLS Web Client Authentication" not in text
    assert "CA:FALSE" in text
    assert run("openssl", "x509", "-in", crt, "-noout", "-checkend", str(29 * 86400)).returncode == 0
    assert run("openssl", "x509", "-in", crt, "-noout", "-checkend", str(31 * 86400), check=False).returncode != 0
    assert mode(key) == 0o600
    # The key belongs to the certificate.
    pub_cert = run("openssl", "x509", "-in", crt, "-noout", "-pubkey").stdout
    pub_key = run("openssl", "pkey", "-in", key, "-pubout").stdout
    assert pub_cert == pub_key


def test_issue_server_defaults_to_one_year_and_only_loopback_and_service_names(pki, edgetunnel):
    edgetunnel("pki", "issue-server", "--pki-dir", pki)
    crt = pki / "server.crt"
    assert san_set(crt) == {("IP Address", "127.0.0.1")} | {("DNS", n) for n in SERVICE_NAMES}
    assert run("openssl", "x509", "-in", crt, "-noout", "-checkend", str(364 * 86400)).returncode == 0
    assert run("openssl", "x509", "-in", crt, "-noout", "-checkend", str(366 * 86400), check=False).returncode != 0


def test_issue_client_for_a_cloud_caller(pki, tmp_path, edgetunnel):
    out = tmp_path / "apiserver"
    edgetunnel("pki", "issue-client", "--pki-dir", pki, "--name", "kube-apiserver", "--out-dir", out)
    crt = out / "kube-apiserver.crt"
    assert run("openssl", "verify", "-CAfile", pki / "ca.crt", "-purpose", "sslclient", crt).returncode == 0
    text = x509_text(crt)
    assert "TLS Web Client Authentication" in text
    assert "TLS Web Server Authentication" not in text
    assert re.search(r"Subject: CN ?= ?kube-apiserver", text)
    assert mode(out / "kube-apiserver.key") == 0o600


def test_ca_hash_matches_kubeadm_discovery_hash(pki, edgetunnel):
    printed = edgetunnel("pki", "ca-hash", "--pki-dir", pki).stdout.strip()
    pubkey = run("openssl", "x509", "-in", pki / "ca.crt", "-noout", "-pubkey").stdout
    # kubeadm's recipe: the DER SubjectPublicKeyInfo, hashed with SHA-256.
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pubkey.encode(),
                         capture_output=True, check=True).stdout
    assert printed == "sha256:" + hashlib.sha256(der).hexdigest()


def test_show_text_and_json(pki, edgetunnel):
    edgetunnel("pki", "issue-server", "--pki-dir", pki, "--ip", "192.0.2.10")
    text = edgetunnel("pki", "show", pki / "server.crt").stdout
    assert "192.0.2.10" in text and "x-tunnel-server-svc.kube-system.svc" in text
    assert "CN=edge-tunnel-server" in text and "CN=edge-tunnel-ca" in text
    data = json.loads(edgetunnel("pki", "show", pki / "server.crt", "--output", "json").stdout)
    fingerprint = run("openssl", "x509", "-in", pki / "server.crt", "-noout", "-fingerprint", "-sha256").stdout
    assert data["sha256Fingerprint"] == fingerprint.strip().split("=", 1)[1]
    assert set(data["ipAddresses"]) == {"192.0.2.10", "127.0.0.1"}
    assert set(data["dnsNames"]) == set(SERVICE_NAMES)
    assert data["extendedKeyUsage"] == ["serverAuth"]
    assert data["isCA"] is False
    assert data["notAfter"].endswith("Z")


def test_tokens_are_kubeadm_shaped_and_stored_hashed(pki, edgetunnel):
    token = edgetunnel("token", "create", "--pki-dir", pki, "--ttl", "2h", "--description", "pool-a").stdout.strip()
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", token)
    token_id, secret = token.split(".")
    stored = (pki / "tokens.json").read_text()
    assert secret not in stored and token_id in stored
    assert mode(pki / "tokens.json") == 0o600

    listing = edgetunnel("token", "list", "--pki-dir", pki).stdout
    assert token_id in listing and secret not in listing and "pool-a" in listing
    rows = json.loads(edgetunnel("token", "list", "--pki-dir", pki, "--output", "json").stdout)
    assert [r["id"] for r in rows] == [token_id]
    assert rows[0]["expired"] is False and secret not in json.dumps(rows)

    edgetunnel("token", "delete", "--pki-dir", pki, token_id)
    assert json.loads(edgetunnel("token", "list", "--pki-dir", pki, "--output", "json").stdout) == []


BAD_INPUTS = [
    # (description, how to break the folder, command, words the error must contain)
    ("missing CA", lambda p: (p / "ca.crt").unlink(), ["pki", "issue-server"], ["ca.crt", "does not exist"]),
    ("truncated CA", lambda p: (p / "ca.crt").write_bytes((p / "ca.crt").read_bytes()[:200]),
     ["pki", "issue-server"], ["ca.crt"]),
    ("non-PEM CA", lambda p: (p / "ca.crt").write_text("not a certificate\n"), ["pki", "issue-server"],
     ["ca.crt", "not a PEM"]),
    ("CA is a directory", lambda p: ((p / "ca.crt").unlink(), (p / "ca.crt").mkdir()), ["pki", "issue-server"],
     ["ca.crt"]),
    ("non-PEM key", lambda p: (p / "ca.key").write_text("garbage\n"), ["pki", "issue-client", "--name", "x"],
     ["ca.key"]),
    ("invalid IP", None, ["pki", "issue-server", "--ip", "10.0.0.256"], ["10.0.0.256"]),
    ("invalid DNS", None, ["pki", "issue-server", "--dns", "under_score.example"], ["under_score.example"]),
    ("zero days", None, ["pki", "issue-server", "--days", "0"], ["--days"]),
    ("bad ttl", None, ["token", "create", "--ttl", "tomorrow"], ["--ttl", "tomorrow"]),
    ("malformed token id", None, ["token", "delete", "NOPE!"], ["NOPE!"]),
    ("unknown token", None, ["token", "delete", "abcdef"], ["abcdef"]),
    ("corrupt token file", lambda p: (p / "tokens.json").write_text("{"), ["token", "list"], ["tokens.json"]),
    ("bad client name", None, ["pki", "issue-client", "--name", "../escape"], ["../escape"]),
]


@pytest.mark.parametrize("description,damage,command,needles", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_and_changes_nothing(pki, edgetunnel, description, damage, command, needles):
    if damage:
        damage(pki)
    before = snapshot(pki)
    result = edgetunnel(*command, "--pki-dir", pki, check=False)
    assert_one_line_error(result, *needles)
    assert snapshot(pki) == before


def test_key_that_does_not_match_the_ca(tmp_path, pki, edgetunnel):
    other = tmp_path / "other"
    edgetunnel("pki", "init", "--pki-dir", other)
    (pki / "ca.key").write_bytes((other / "ca.key").read_bytes())
    before = snapshot(pki)
    result = edgetunnel("pki", "issue-server", "--pki-dir", pki, check=False)
    assert_one_line_error(result, "ca.key", "does not match")
    assert snapshot(pki) == before


def test_a_ca_that_is_not_a_ca(pki, edgetunnel):
    edgetunnel("pki", "issue-client", "--pki-dir", pki, "--name", "leaf")
    (pki / "ca.crt").write_bytes((pki / "leaf.crt").read_bytes())
    (pki / "ca.key").write_bytes((pki / "leaf.key").read_bytes())
    before = snapshot(pki)
    assert_one_line_error(edgetunnel("pki", "issue-server", "--pki-dir", pki, check=False), "ca.crt", "not a CA")
    assert_one_line_error(edgetunnel("pki", "ca-hash", "--pki-dir", pki, check=False), "not a CA")
    assert snapshot(pki) == before


def test_an_expired_ca(tmp_path, edgetunnel):
    """A CA whose validity ended yesterday (openssl's CLI cannot back-date, so the cryptography package signs it)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired-ca")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30)).not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    before = snapshot(pki)
    result = edgetunnel("pki", "issue-server", "--pki-dir", pki, check=False)
    assert_one_line_error(result, "ca.crt", "expired")
    assert snapshot(pki) == before
    assert "EXPIRED" in edgetunnel("pki", "show", pki / "ca.crt").stdout


def test_show_of_a_missing_file(tmp_path, edgetunnel):
    assert_one_line_error(edgetunnel("pki", "show", tmp_path / "nope.crt", check=False), "nope.crt")


def test_a_ca_made_by_openssl_is_usable(tmp_path, edgetunnel):
    pki = tmp_path / "pki"
    pki.mkdir()
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", pki / "ca.key", "-out", pki / "ca.crt", "-days", "30", "-subj", "/CN=corp-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    edgetunnel("pki", "issue-server", "--pki-dir", pki, "--ip", "10.9.9.9")
    assert run("openssl", "verify", "-CAfile", pki / "ca.crt", pki / "server.crt").returncode == 0


def test_every_binary_prints_the_same_version():
    """`--version` on the server, the agent and the CLI: one release number, for bug reports and images."""
    versions = {run(BIN / name, "--version").stdout.strip() for name in ("edge-tunnel-server", "edge-tunnel-agent", "edgetunnel")}
    assert len(versions) == 1 and all(part.isdigit() for part in versions.pop().split(".")), versions
