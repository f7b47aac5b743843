import NIOConcurrencyHelpers
import NIOCore
import TunnelPKI

/// Which agent serves which node, shared by every frontend of a server. Thread-safe.
///
/// A node registers under its certificate's name and the IPs it reports. An IP that another connected node
/// holds is refused; a second connection for the same node replaces the first (an agent that reconnected
/// before the server noticed its old connection die).
///
/// With Node objects (``checkIPs(against:)``), an IP leads to a node's agent only while its Node object reports
/// it: HELLO checks the claim once, and ``recheckIPs(of:)`` again whenever the Node's addresses change.
public final class AgentRegistry: @unchecked Sendable {
    private let lock = NIOLock()
    private var byNode: [String: AgentSession] = [:]
    /// Which node each routed IP leads to: the IPs the registered agents claimed, less those their Node objects
    /// no longer report.
    private var ipOwner: [String: String] = [:]
    /// With Node objects: the addresses a node's Node object reports now, nil if there is no such Node.
    private var nodeAddresses: (@Sendable (String) -> [String]?)?
    /// Sessions whose connection was lost while they had streams, waiting for their agent (``suspend(_:)``).
    private var suspendedByNode: [String: AgentSession] = [:]
    /// Every agent connection with a node certificate, registered or not (waiting for HELLO, draining,
    /// replaced): a revocation must reach them all.
    private var live: [ObjectIdentifier: AgentSession] = [:]
    /// Bytes moved by sessions that have ended, so totals never go backwards.
    private var retiredBytesIn = 0
    private var retiredBytesOut = 0

    public init() {}

    public enum RegistrationError: Error, CustomStringConvertible {
        case ipHeldByOtherNode(ip: String, node: String)
        public var description: String {
            switch self {
            case .ipHeldByOtherNode(let ip, let node): "node IP \(ip) is already registered by node \(node)"
            }
        }
    }

    /// From now on an IP leads to a node's agent only while `addresses` (the addresses the node's Node object
    /// reports now; nil: there is no such Node) names it: at registration, and at each ``recheckIPs(of:)``.
    /// `addresses` is called under the registry's lock: it must not call back into the registry.
    func checkIPs(against addresses: @escaping @Sendable (String) -> [String]?) {
        lock.withLock { nodeAddresses = addresses }
    }

    /// Registers `session`; returns the session it replaced, if any (the caller closes it).
    ///
    /// With Node objects, only the claimed IPs that the Node reports at this moment are routed: HELLO checked
    /// them a moment earlier, and a Node update in between has already been rechecked (before this session was
    /// registered), so it is applied here.
    func register(_ session: AgentSession) throws -> AgentSession? {
        try lock.withLock {
            let routed = routable(session.nodeIPs, of: session.nodeName)
            for ip in routed {
                if let owner = ipOwner[ip], owner != session.nodeName {
                    throw RegistrationError.ipHeldByOtherNode(ip: ip, node: owner)
                }
            }
            let previous = byNode[session.nodeName]
            if let previous {
                for ip in previous.nodeIPs where ipOwner[ip] == previous.nodeName { ipOwner[ip] = nil }
            }
            byNode[session.nodeName] = session
            for ip in routed { ipOwner[ip] = session.nodeName }
            return previous
        }
    }

    /// Removes `session` if it is still the one registered for its node.
    func unregister(_ session: AgentSession) {
        lock.withLock {
            guard byNode[session.nodeName] === session else { return }
            byNode[session.nodeName] = nil
            for ip in session.nodeIPs where ipOwner[ip] == session.nodeName { ipOwner[ip] = nil }
        }
    }

    /// Checks again which of the IPs `node`'s registered agent claimed lead to it, against the addresses its
    /// Node object reports now (``checkIPs(against:)``; call it whenever they change, and when the Node goes away).
    /// An IP the Node no longer reports stops leading to the agent (removed from the Node, or given to another
    /// Node, whose agent may then register it); one it reports again leads to it again, unless another node
    /// holds it meanwhile. The tunnel stays, and routing by node name with it. Returns the IPs that stopped
    /// leading to the agent.
    @discardableResult
    func recheckIPs(of node: String) -> [String] {
        lock.withLock {
            guard let session = byNode[node] else { return [] }
            let routed = Set(routable(session.nodeIPs, of: node))
            var dropped: [String] = []
            for ip in session.nodeIPs {
                if routed.contains(ip) {
                    if ipOwner[ip] == nil { ipOwner[ip] = node }
                } else if ipOwner[ip] == node {
                    ipOwner[ip] = nil
                    dropped.append(ip)
                }
            }
            return dropped
        }
    }

    /// The IPs that lead to `node`'s registered agent now.
    func routedIPs(of node: String) -> [String] {
        lock.withLock { byNode[node]?.nodeIPs.filter { ipOwner[$0] == node } ?? [] }
    }

    /// Of `ips` (claimed by `node`'s agent, in canonical form), those its Node object reports now; all of them
    /// without Node objects. Called under the lock.
    private func routable(_ ips: [String], of node: String) -> [String] {
        guard let nodeAddresses else { return ips }
        let reported = Set((nodeAddresses(node) ?? []).compactMap { IPAddress($0) })
        return ips.filter { ip in IPAddress(ip).map { reported.contains($0) } ?? false }
    }

    /// `session`'s connection was lost and its streams wait to be resumed: it is kept by node until the agent
    /// comes back with its token, or the grace period ends (``forgetSuspended(_:)``). At most one per node.
    func suspend(_ session: AgentSession) -> AgentSession? {
        lock.withLock {
            let previous = suspendedByNode[session.nodeName]
            suspendedByNode[session.nodeName] = session
            return previous === session ? nil : previous
        }
    }

    /// Tunnels whose streams wait for their agent now.
    var suspendedCount: Int { lock.withLock { suspendedByNode.count } }

    func forgetSuspended(_ session: AgentSession) {
        lock.withLock {
            if suspendedByNode[session.nodeName] === session { suspendedByNode[session.nodeName] = nil }
        }
    }

    /// The session of `node` an agent may resume with one of `tokens`: its suspended one, or its registered one if
    /// the agent found its connection dead first. Nil if none matches; a suspended session that does not match
    /// is returned as `stale` (the agent came back without it: a restart).
    func resumable(node: String, tokens: [String]) -> (match: AgentSession?, stale: AgentSession?) {
        lock.withLock {
            let suspended = suspendedByNode[node]
            if let suspended, suspended.holdsResumeToken(in: tokens) {
                suspendedByNode[node] = nil
                return (suspended, nil)
            }
            if let registered = byNode[node], registered.holdsResumeToken(in: tokens) { return (registered, suspended) }
            return (nil, suspended)
        }
    }

    func track(_ session: AgentSession) {
        lock.withLock { live[ObjectIdentifier(session)] = session }
    }

    func untrack(_ session: AgentSession) {
        lock.withLock { live[ObjectIdentifier(session)] = nil }
    }

    /// Every agent connection alive now (see `live`).
    var liveSessions: [AgentSession] { lock.withLock { Array(live.values) } }

    func retire(bytesIn: Int, bytesOut: Int) {
        lock.withLock {
            retiredBytesIn += bytesIn
            retiredBytesOut += bytesOut
        }
    }

    /// The agent for a node name or a registered node IP.
    public func lookup(host: String) -> AgentSession? {
        lock.withLock {
            if let session = byNode[host] { return session }
            let bare = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
            if let node = ipOwner[bare] { return byNode[node] }
            return nil
        }
    }

    public var sessions: [AgentSession] {
        lock.withLock { Array(byNode.values) }
    }

    public var count: Int { lock.withLock { byNode.count } }

    /// Total bytes from agents and to agents, over all sessions past and present.
    public var totalBytes: (fromAgents: Int, toAgents: Int) {
        let (retiredIn, retiredOut, live) = lock.withLock { (retiredBytesIn, retiredBytesOut, Array(byNode.values)) }
        var totalIn = retiredIn
        var totalOut = retiredOut
        for session in live {
            let snapshot = session.mux.counters.snapshot
            totalIn += snapshot.bytesIn
            totalOut += snapshot.bytesOut
        }
        return (totalIn, totalOut)
    }
}
