"""Network namespaces for topology tests: created by the test, deleted afterwards even when the test fails.

Under CI (CI=true, root) failing to create a namespace is a test failure; elsewhere the test is skipped with
the reason, never passed silently.

Tests run in parallel (pytest-xdist): every namespace and veth name carries a random tag, addresses and ports are
namespace-local, and iptables runs with `-w`, since legacy iptables holds one lock (/run/xtables.lock) for every
namespace and refuses at once without it.
"""
import contextlib
import os
import subprocess
import uuid

import pytest


def sh(*args, check=True):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check, timeout=60)


def require_netns():
    probe = f"etprobe{uuid.uuid4().hex[:6]}"
    result = sh("ip", "netns", "add", probe, check=False)
    if result.returncode == 0:
        sh("ip", "netns", "del", probe, check=False)
        return
    message = f"cannot create network namespaces here: {result.stderr.strip()}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def two_hosts(prefix="10.231.7"):
    """Two namespaces joined by a veth pair: (name_a, ip_a, name_b, ip_b)."""
    require_netns()
    tag = uuid.uuid4().hex[:6]
    a, b = f"eta{tag}", f"etb{tag}"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        sh("ip", "link", "set", f"va{tag}", "netns", a)
        sh("ip", "link", "set", f"vb{tag}", "netns", b)
        for ns, dev, ip in [(a, f"va{tag}", f"{prefix}.1"), (b, f"vb{tag}", f"{prefix}.2")]:
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield a, f"{prefix}.1", b, f"{prefix}.2"
    finally:
        sh("ip", "netns", "del", a, check=False)
        sh("ip", "netns", "del", b, check=False)


class Topology:
    """cloud ── private line ── edge, and edge ── inet (masquerading router) ── cloud.

    cloud: 10.240.1.1 on the private line, 10.240.3.1 as its public address (towards inet).
    edge:  10.240.1.2 on the private line, 10.240.2.2 towards inet (default route). New inbound connections
           to the edge are dropped: the cloud can never dial the edge.
    inet:  routes edge → cloud and masquerades, so the cloud sees the edge's internet traffic as 10.240.3.2.
    """

    PRIVATE = "10.240.1.1"
    PUBLIC = "10.240.3.1"

    def __init__(self):
        tag = uuid.uuid4().hex[:5]
        self.cloud, self.edge, self.inet = f"cloud{tag}", f"edge{tag}", f"inet{tag}"
        self.private_link = f"pe{tag}"  # the edge end of the private line
        self.tag = tag

    def __enter__(self):
        require_netns()
        t = self.tag
        try:
            for ns in (self.cloud, self.edge, self.inet):
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            links = [
                (self.cloud, f"pc{t}", "10.240.1.1/30", self.edge, f"pe{t}", "10.240.1.2/30"),
                (self.edge, f"ie{t}", "10.240.2.2/30", self.inet, f"ii{t}", "10.240.2.1/30"),
                (self.inet, f"io{t}", "10.240.3.2/30", self.cloud, f"ic{t}", "10.240.3.1/30"),
            ]
            for ns_a, dev_a, ip_a, ns_b, dev_b, ip_b in links:
                sh("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
                sh("ip", "-n", ns_a, "addr", "add", ip_a, "dev", dev_a)
                sh("ip", "-n", ns_b, "addr", "add", ip_b, "dev", dev_b)
                sh("ip", "-n", ns_a, "link", "set", dev_a, "up")
                sh("ip", "-n", ns_b, "link", "set", dev_b, "up")
            sh("ip", "-n", self.edge, "route", "add", "default", "via", "10.240.2.1")
            sh("ip", "netns", "exec", self.inet, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            sh("ip", "netns", "exec", self.inet, "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", f"io{t}",
               "-j", "MASQUERADE")
            for dev in (f"pe{t}", f"ie{t}"):
                sh("ip", "netns", "exec", self.edge, "iptables", "-w", "-A", "INPUT", "-i", dev, "-m", "conntrack",
                   "--ctstate", "NEW", "-j", "DROP")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for ns in (self.cloud, self.edge, self.inet):
            sh("ip", "netns", "del", ns, check=False)

    def run(self, ns, *args, check=True, timeout=60):
        return subprocess.run(["ip", "netns", "exec", ns, *[str(a) for a in args]], capture_output=True, text=True,
                              check=check, timeout=timeout)

    def cut_private_line(self):
        sh("ip", "-n", self.edge, "link", "set", self.private_link, "down")

    def restore_private_line(self):
        sh("ip", "-n", self.edge, "link", "set", self.private_link, "up")


class ClusterNetwork:
    """Server "pods" behind a ClusterIP made as kube-proxy makes one in iptables mode, and an edge.

    router: one veth to each pod (10.250.N.1/30 ↔ 10.250.N.2/30) and one to the edge (10.250.99.1/30 ↔
            10.250.99.2/30); it forwards, and DNATs CLUSTER_IP:port to the port's endpoints with
            `-m statistic --mode random --probability 1/(n-i)`, one chain per port, as kube-proxy's KUBE-SVC-*
            chains. Changing the endpoints rewrites the chain (existing connections keep their conntrack entry).
    podN:   a server replica at 10.250.N.2.
    edge:   the agents and the callers, at 10.250.99.2.
    """

    CLUSTER_IP = "10.96.0.10"
    EDGE_IP = "10.250.99.2"

    def __init__(self, pods):
        tag = uuid.uuid4().hex[:5]
        self.tag = tag
        self.router, self.edge = f"rt{tag}", f"ed{tag}"
        self.pods = [f"p{i}{tag}" for i in range(1, pods + 1)]
        self.endpoints = {}

    def pod_ip(self, index):
        return f"10.250.{index + 1}.2"

    def __enter__(self):
        require_netns()
        t = self.tag
        try:
            for ns in (self.router, self.edge, *self.pods):
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            links = [(ns, f"10.250.{i + 1}") for i, ns in enumerate(self.pods)] + [(self.edge, "10.250.99")]
            for ns, net in links:
                outside, inside = f"r{net.split('.')[-1]}{t}", f"i{net.split('.')[-1]}{t}"
                sh("ip", "link", "add", outside, "netns", self.router, "type", "veth", "peer", "name", inside, "netns", ns)
                sh("ip", "-n", self.router, "addr", "add", f"{net}.1/30", "dev", outside)
                sh("ip", "-n", ns, "addr", "add", f"{net}.2/30", "dev", inside)
                sh("ip", "-n", self.router, "link", "set", outside, "up")
                sh("ip", "-n", ns, "link", "set", inside, "up")
                sh("ip", "-n", ns, "route", "add", "default", "via", f"{net}.1")
            sh("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for ns in (self.router, self.edge, *self.pods):
            sh("ip", "netns", "del", ns, check=False)

    def iptables(self, *args):
        sh("ip", "netns", "exec", self.router, "iptables", "-w", "-t", "nat", *args)

    def set_endpoints(self, port, pod_indexes):
        """Points CLUSTER_IP:port at these pods, each equally likely, as kube-proxy does: in one iptables-restore
        transaction, so no packet ever meets an empty chain."""
        chain = f"SVC-{port}"
        if port not in self.endpoints:
            self.iptables("-N", chain)
            self.iptables("-A", "PREROUTING", "-d", self.CLUSTER_IP, "-p", "tcp", "--dport", str(port), "-j", chain)
        rules = ["*nat", f"-F {chain}"]
        n = len(pod_indexes)
        for i, index in enumerate(pod_indexes):
            target = f"-j DNAT --to-destination {self.pod_ip(index)}:{port}"
            if i < n - 1:
                rules.append(f"-A {chain} -p tcp -m statistic --mode random --probability {1 / (n - i):.10f} {target}")
            else:
                rules.append(f"-A {chain} -p tcp {target}")
        rules.append("COMMIT")
        subprocess.run(["ip", "netns", "exec", self.router, "iptables-restore", "-w", "--noflush"],
                       input="\n".join(rules) + "\n", capture_output=True, text=True, check=True, timeout=60)
        self.endpoints[port] = list(pod_indexes)

    def run(self, ns, *args, check=True, timeout=60):
        return subprocess.run(["ip", "netns", "exec", ns, *[str(a) for a in args]], capture_output=True, text=True,
                              check=check, timeout=timeout)


class PoolsTopology:
    """Two edge sites, one per edge node pool, and a cloud that serves them both (issue 26, item 5).

        edge-a ── line A ──────┐
           └───── inet ──── cloud      (inet: a masquerading router; cloud: 203.0.113.1, its public address)
        edge-b ── inet ────────┘
           └── line B (down until `provision_line_b`) ── cloud

    cloud: the server. Its line ends are 10.242.1.1 (A) and 10.242.2.1 (B); 203.0.113.1 faces inet (a documentation
           prefix, so that a lone public address reads as the internet, as a real one would). The server "pod" is
           POD_IP (on lo: this kernel has no dummy links), behind the ClusterIP CLUSTER_IP made as kube-proxy makes one
           in iptables mode: KUBE-SERVICES (PREROUTING and OUTPUT) → KUBE-SVC-* → KUBE-SEP-* DNAT to the pod, with no
           masquerade, so the server sees a line's edge address as the agent's.
    edge-a: site A, pool A's CIDR 10.242.1.0/24: 10.242.1.2 on line A (routes the Service range 10.96.0.0/12 over it),
           10.242.1.6 towards inet (default route).
    edge-b: site B, pool B's CIDR 10.242.2.0/24: 10.242.2.6 towards inet (default route), 10.242.2.2 on line B, whose
           link is down and whose Service route is missing until `provision_line_b`: the ClusterIP is unreachable
           from site B until then.
    inet:  routes the sites' inet sides to the cloud's public address only (no route to the Service range) and
           masquerades them as 203.0.113.2. New inbound connections to either edge are dropped: the cloud never
           dials an edge.
    """

    CLUSTER_IP = "10.96.0.10"
    SERVICE_RANGE = "10.96.0.0/12"
    POD_IP = "10.244.0.5"
    PUBLIC = "203.0.113.1"
    MASQUERADED = "203.0.113.2"  # how the cloud sees either site's internet traffic
    SITES = {"a": "10.242.1", "b": "10.242.2"}  # each site's /24: .1/.2 the line, .5/.6 towards inet

    def __init__(self):
        tag = uuid.uuid4().hex[:5]
        self.tag = tag
        self.cloud, self.inet = f"cloud{tag}", f"inet{tag}"
        self.edges = {site: f"edge{site}{tag}" for site in self.SITES}
        self.line_links = {site: f"p{site}{tag}" for site in self.SITES}  # the edge end of each site's line

    def node_ip(self, site):
        """The address a site's node claims (status.hostIP): its line address at A, its inet-side one at B."""
        return f"{self.SITES[site]}.2" if site == "a" else f"{self.SITES[site]}.6"

    def __enter__(self):
        require_netns()
        t = self.tag
        try:
            for ns in (self.cloud, self.inet, *self.edges.values()):
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            links = [(self.inet, f"ro{t}", f"{self.MASQUERADED}/30", self.cloud, f"ic{t}", f"{self.PUBLIC}/30")]
            for site, net in self.SITES.items():
                edge = self.edges[site]
                links.append((self.cloud, f"l{site}{t}", f"{net}.1/30", edge, f"p{site}{t}", f"{net}.2/30"))
                links.append((self.inet, f"r{site}{t}", f"{net}.5/30", edge, f"i{site}{t}", f"{net}.6/30"))
            for ns_a, dev_a, ip_a, ns_b, dev_b, ip_b in links:
                sh("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
                sh("ip", "-n", ns_a, "addr", "add", ip_a, "dev", dev_a)
                sh("ip", "-n", ns_b, "addr", "add", ip_b, "dev", dev_b)
                sh("ip", "-n", ns_a, "link", "set", dev_a, "up")
                if dev_b != f"pb{t}":  # line B is not provisioned yet
                    sh("ip", "-n", ns_b, "link", "set", dev_b, "up")
            for site, net in self.SITES.items():
                edge = self.edges[site]
                sh("ip", "-n", edge, "route", "add", "default", "via", f"{net}.5")
                for dev in (f"p{site}{t}", f"i{site}{t}"):
                    sh("ip", "netns", "exec", edge, "iptables", "-w", "-A", "INPUT", "-i", dev, "-m", "conntrack",
                       "--ctstate", "NEW", "-j", "DROP")
            sh("ip", "-n", self.edges["a"], "route", "add", self.SERVICE_RANGE, "via", f"{self.SITES['a']}.1")
            sh("ip", "netns", "exec", self.inet, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            sh("ip", "netns", "exec", self.inet, "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", f"ro{t}",
               "-j", "MASQUERADE")
            sh("ip", "-n", self.cloud, "addr", "add", f"{self.POD_IP}/32", "dev", "lo")
            rules = ["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-SVC-LINE - [0:0]", ":KUBE-SEP-POD - [0:0]",
                     "-A PREROUTING -m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
                     "-A OUTPUT -m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
                     f"-A KUBE-SERVICES -d {self.CLUSTER_IP}/32 -p tcp --dport 10262 -j KUBE-SVC-LINE",
                     "-A KUBE-SVC-LINE -j KUBE-SEP-POD",
                     f"-A KUBE-SEP-POD -p tcp -j DNAT --to-destination {self.POD_IP}:10262", "COMMIT"]
            subprocess.run(["ip", "netns", "exec", self.cloud, "iptables-restore", "-w", "--noflush"],
                           input="\n".join(rules) + "\n", capture_output=True, text=True, check=True, timeout=60)
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for ns in (self.cloud, self.inet, *self.edges.values()):
            sh("ip", "netns", "del", ns, check=False)

    def run(self, ns, *args, check=True, timeout=60):
        return subprocess.run(["ip", "netns", "exec", ns, *[str(a) for a in args]], capture_output=True, text=True,
                              check=check, timeout=timeout)

    def provision_line_b(self):
        """Site B gets its line: the link up and the Service range routed over it."""
        sh("ip", "-n", self.edges["b"], "link", "set", self.line_links["b"], "up")
        sh("ip", "-n", self.edges["b"], "route", "add", self.SERVICE_RANGE, "via", f"{self.SITES['b']}.1")

    def drop_line(self, site, on):
        """iptables DROP both ways at the site's end of its line (the link stays up)."""
        action, dev = ("-I" if on else "-D"), self.line_links[site]
        self.run(self.edges[site], "iptables", "-w", action, "INPUT", "-i", dev, "-j", "DROP")
        self.run(self.edges[site], "iptables", "-w", action, "OUTPUT", "-o", dev, "-j", "DROP")

    def cut_line(self, site):
        sh("ip", "-n", self.edges[site], "link", "set", self.line_links[site], "down")
