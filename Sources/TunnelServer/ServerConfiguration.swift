import Foundation
import NIOCore
import TunnelPKI
import TunnelSupport

/// Everything a tunnel server needs to start. Flags and the YAML config file fill it in.
public struct ServerConfiguration: Sendable {
    /// The PKI folder: the CA (unless ``caDirectory`` names another), `tokens.json` and `nodes.json`. Replicas
    /// share it.
    public var pkiDirectory = PKIPaths.defaultServerDirectory
    /// Where `ca.crt` and `ca.key` are read from, when not from the PKI folder: a Secret mounted read-only into
    /// every replica (`--ca-dir`). Nil: the PKI folder.
    public var caDirectory: String?
    /// Where this replica writes its own serving certificate and kubelet client certificate (`--state-dir`): a
    /// folder of its own (an emptyDir), so that replicas sharing a CA never overwrite each other's. Nil: the PKI
    /// folder.
    public var stateDirectory: String?
    public var bindAddress = "0.0.0.0"
    public var tunnelPort = 10262
    public var securePort = 10263
    public var metaPort = 10265
    /// Plain-HTTP Host routing (kubelet read-only port style); 0 turns it off.
    public var insecurePort = 10264
    public var insecureBindAddress = "127.0.0.1"
    /// A Unix socket (created mode 0600) that accepts CONNECT from a co-located caller without TLS, as
    /// kube-apiserver's egress selector does with `transport.uds`; nil: off.
    public var udsPath: String?
    /// A Unix socket (created mode 0600) that serves konnectivity's `ProxyService/Proxy` over gRPC, as
    /// kube-apiserver's egress selector uses with `proxyProtocol: GRPC`; nil: off.
    public var grpcUdsPath: String?
    /// The proxy-client identity presented to kubelets; default: one issued from the tunnel CA
    /// (`kubelet-client.crt` in the PKI folder).
    public var kubeletClientCert: String?
    public var kubeletClientKey: String?
    /// CA that signed the kubelets' serving certificates; without it they are not verified (logged once).
    public var kubeletCAFile: String?
    /// Addresses the server is reached at, for its certificate's SANs (besides 127.0.0.1 and the Service names).
    public var certIPs: [String] = []
    public var certDNSNames: [String] = []
    /// CA for callers on the secure port; `nil`: the tunnel CA.
    public var clientCAFile: String?
    /// Identifies this replica to agents and in `/v1/agents`.
    public var serverID = ProcessInfo.processInfo.hostName
    /// Server replicas behind the agents' server address (`--server-count`): each agent keeps one tunnel to
    /// every replica, so that any replica reaches any node.
    public var serverCount = 1
    /// With several replicas, a replica reports ready (`/readyz`) once every joined node holds a tunnel to it, or
    /// at the latest this long after its start (nodes that are offline must not keep it unready forever).
    public var replicaWarmup: TimeAmount = .seconds(60)
    /// Replica probes a second this replica aims to answer at most (``ReplicaProbe``): it asks agents that reached
    /// it while already holding it to wait (agents held here) / (this × replicas) before probing again. A probe
    /// costs an accept and a line. With 3 replicas, 10,000 agents look for a returned replica every 3.3 s, and
    /// 2,000 or fewer every second.
    public var replicaProbeRate = 1000
    /// Count the replicas by their `coordination.k8s.io/v1` Leases in this namespace (each replica holds one):
    /// the count then follows scaling with no flag changed. Nil: `serverCount`.
    public var leaseNamespace: String?
    /// The label the replicas' Leases carry (`key=value`).
    public var leaseLabel = "k8s-app=edge-tunnel-server"
    /// `namespace/name` of the Service the server is reached through: its addresses (ClusterIP, LoadBalancer
    /// ingress, externalIPs) are added to the serving certificate's SANs live. Nil: only `certIPs`/`certDNSNames`.
    public var addressServices: [String] = []
    /// Agents register only as existing Node objects and claim only addresses their Node reports; a deleted
    /// Node's tunnel closes (`--node-objects`).
    public var checkNodeObjects = false
    /// With Node objects: the Node label whose value is the node's edge pool (`--pool-label`); when a Node lacks
    /// it, OpenYurt's `apps.openyurt.io/nodepool` and ACK's `alibabacloud.com/nodepool-id` are read. The Node's
    /// pool wins over the one its agent declares at HELLO.
    public var poolLabel = PoolName.openYurtLabel
    /// Keep bootstrap tokens and node records as ConfigMaps in this namespace (``KubeJoinState``), which every
    /// replica watches, instead of `tokens.json` and `nodes.json` in the PKI folder. Nil: the folder.
    public var joinStateNamespace: String?
    /// A kubeconfig for the Kubernetes API; nil: the pod's service account (in cluster).
    public var kubeconfig: String?
    /// How long the server waits for an agent to answer an OPEN before answering 504.
    public var dialTimeout: TimeAmount = .seconds(15)
    public var keepaliveInterval: TimeAmount = .seconds(5)
    /// An agent silent for this long is considered dead.
    public var keepaliveTimeout: TimeAmount = .seconds(20)
    /// How long the streams of an agent whose connection was lost wait for it to come back and resume them
    /// (protocol version 3); zero: streams end with their connection.
    public var resumeGrace: TimeAmount = .seconds(30)
    /// A TLS handshake or join that takes longer is abandoned.
    public var handshakeTimeout: TimeAmount = .seconds(10)
    /// Connections of one listener still in their TLS handshake (or, on plain ports, before their request
    /// head), in all and per source IP; more are closed at once and counted.
    public var maxPendingConnections = 4096
    public var maxPendingConnectionsPerSource = 256
    /// Streams open at once through one agent, and streams to one agent still waiting for its answer.
    public var maxStreamsPerAgent = 20_000
    public var maxPendingOpensPerAgent = 1024
    /// Streams open at once for one caller identity (the client certificate's CN on the secure port; the source
    /// address on the insecure port; the Unix socket as one caller).
    public var maxStreamsPerCaller = 20_000
    /// Receive windows over all tunnels: bounds what slow readers can make the server hold (see docs/SECURITY.md).
    public var maxBufferedBytes = 512 << 20
    /// The insecure port has no authentication: it binds to a non-loopback address only when this is set.
    public var allowInsecureBind = false
    /// How long in-flight streams may take to finish on shutdown.
    public var drainTimeout: TimeAmount = .seconds(10)
    /// Event-loop threads. A relay's work is split about evenly between its loop and the kernel's network
    /// stack, and every byte crossing from a caller's loop to a tunnel's loop costs a thread wake-up; on the
    /// 2-core benchmark machine one loop served 25% more 1 KiB requests than two, and moved as much or more
    /// in bulk (docs/benchmarks.md). Hence one loop per two cores.
    public var eventLoopThreads = max(1, System.coreCount / 2)
    /// Lifetime of the server's own serving certificate; it is re-issued two thirds into it.
    public var servingCertificateValidity: TimeInterval = 365 * 86400
    /// Lifetime of the node certificates the server signs at join and renewal; agents renew at two thirds.
    public var agentCertificateValidity: TimeInterval = CertificateAuthority.defaultNodeValidity

    public init() {}

    public var paths: PKIPaths { PKIPaths(directory: pkiDirectory) }
    /// Where the CA is read from.
    public var caPaths: PKIPaths { PKIPaths(directory: caDirectory ?? pkiDirectory) }
    /// Where this replica keeps its serving and kubelet client certificates.
    public var statePaths: PKIPaths { PKIPaths(directory: stateDirectory ?? pkiDirectory) }
}
