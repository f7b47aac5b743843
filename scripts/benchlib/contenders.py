"""The contenders: `direct`, socat, `ssh -R` (default and tuned), EdgeTunnel's `edgetunnel forward` over TLS
CONNECT, the Unix socket and the gRPC socket, and its Host-routed HTTP port; each with its entry port per target
and the processes that relay its traffic (`lab.relays`)."""
import os
import shutil

from benchlib.lab import start_pair, start_targets, wait_port
from freeport import free_port


def setup(lab):
    """Targets, and one entry port per contender. Returns {contender: port} for iperf3 and for nginx."""
    tmp = lab.tmp
    iperf_port, nginx_port = start_targets(lab)
    targets = {"iperf": iperf_port, "nginx": nginx_port}
    ports = {name: {} for name in targets}

    for name, port in targets.items():
        ports[name]["direct"] = port
        relay = free_port()
        lab.spawn(["socat", f"TCP-LISTEN:{relay},bind=127.0.0.1,reuseaddr,fork,nodelay", f"TCP:127.0.0.1:{port},nodelay"],
                  f"socat-{name}")
        ports[name]["socat"] = relay

    # OpenSSH: a throwaway sshd on loopback and a reverse forward per target, default and tuned.
    ssh_dir = tmp / "ssh"
    ssh_dir.mkdir()
    lab.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ssh_dir / "host")
    lab.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ssh_dir / "user")
    shutil.copy(ssh_dir / "user.pub", ssh_dir / "authorized_keys")
    os.makedirs("/run/sshd", exist_ok=True)
    sshd_port = free_port()
    (ssh_dir / "sshd_config").write_text(f"""
Port {sshd_port}
ListenAddress 127.0.0.1
HostKey {ssh_dir}/host
AuthorizedKeysFile {ssh_dir}/authorized_keys
PermitRootLogin yes
StrictModes no
UsePAM no
PidFile {ssh_dir}/sshd.pid
""")
    lab.spawn(["/usr/sbin/sshd", "-D", "-e", "-f", ssh_dir / "sshd_config"], "sshd")
    wait_port(sshd_port)
    common = ["ssh", "-i", ssh_dir / "user", "-p", sshd_port, "-o", "StrictHostKeyChecking=no",
              "-o", "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR"]
    for name, port in targets.items():
        default, tuned = free_port(), free_port()
        lab.spawn([*common, "-N", "-R", f"127.0.0.1:{default}:127.0.0.1:{port}", "root@127.0.0.1"], f"ssh-{name}")
        # -tt makes OpenSSH set TCP_NODELAY; a remote command keeps the session open.
        lab.spawn([*common, "-tt", "-c", "aes128-gcm@openssh.com", "-R", f"127.0.0.1:{tuned}:127.0.0.1:{port}",
                   "root@127.0.0.1", "sleep", "86400"], f"ssh-tuned-{name}")
        ports[name]["ssh -R"] = default
        ports[name]["ssh -R tuned"] = tuned
    for name in targets:
        wait_port(ports[name]["ssh -R"])
        wait_port(ports[name]["ssh -R tuned"])

    # EdgeTunnel: server, agent, and `edgetunnel forward` to carry tools that cannot speak CONNECT.
    pair = start_pair(lab, "bench", [iperf_port, nginx_port])
    lab.pair, lab.targets = pair, targets
    pki, secure, edgetunnel = pair["pki"], pair["secure"], lab.bin / "edgetunnel"
    # One forward per target and path, as (label, log-name tag, --server arguments): TLS CONNECT to the secure
    # port, CONNECT on the Unix socket, and the gRPC frontend (konnectivity's protocol, as kube-apiserver in GRPC
    # mode speaks it): a Proxy RPC per connection on one gRPC connection to --grpc-uds-path.
    forwards = [("EdgeTunnel (forward → TLS CONNECT)", "",
                 ["--server", f"127.0.0.1:{secure}", "--ca-file", pki / "ca.crt", "--cert", pki / "bench.crt",
                  "--key", pki / "bench.key"]),
                ("EdgeTunnel (forward → Unix socket CONNECT)", "uds-", ["--server", f"unix:{pair['uds']}"]),
                ("EdgeTunnel (forward → gRPC socket)", "grpc-", ["--server", f"grpc:{pair['grpc']}"])]
    for label, tag, server in forwards:
        for name, port in targets.items():
            forward = free_port()
            lab.spawn([edgetunnel, "forward", *server, "--listen", f"127.0.0.1:{forward}",
                       "--to", f"{pair['node']}:{port}"], f"forward-{tag}{name}")
            wait_port(forward)
            ports[name][label] = forward
    # HTTP needs no forward: the insecure port routes each connection by its Host to the node, and wrk sends
    # that Host. Caller → server → tunnel → agent → nginx, the same hops and encryptions as ssh -R.
    host_routed = "EdgeTunnel (Host-routed HTTP port)"
    ports["nginx"][host_routed] = pair["insecure"]
    lab.wrk_host = {host_routed: f"{pair['node']}:{nginx_port}"}
    # Who relays each contender's traffic to each target: socat forks a child per connection, sshd a session
    # per client (its descendants carry the forwards), EdgeTunnel's server and agent are shared by its rows.
    edge = [pair["server"], pair["agent"]]
    lab.relays = {name: {"direct": [], "socat": [lab.named[f"socat-{name}"]],
                         "ssh -R": [lab.named["sshd"], lab.named[f"ssh-{name}"]],
                         "ssh -R tuned": [lab.named["sshd"], lab.named[f"ssh-tuned-{name}"]],
                         **{label: [*edge, lab.named[f"forward-{tag}{name}"]] for label, tag, _ in forwards}}
                  for name in targets}
    lab.relays["nginx"][host_routed] = edge
    return ports
