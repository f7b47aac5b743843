"""The stand-in's process state (kube_standin.py): its folder, port and addresses from the command line, the store
of objects with its resource versions and events, the tokens it has seen, and its serving certificate."""
import re
import datetime
import os
import pathlib
import sys
import threading

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
tokens = {"current": None, "previous": {}}  # the token in DIR/token, and earlier ones with their expiry
KINDS = {"leases": ("Lease", "coordination.k8s.io/v1"), "services": ("Service", "v1"),
         "configmaps": ("ConfigMap", "v1"), "nodes": ("Node", "v1")}
MICRO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def flag(name, default=None):
    """The text of DIR/name, or `default` when the file is absent."""
    try:
        return (DIR / name).read_text().strip()
    except FileNotFoundError:
        return default


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
