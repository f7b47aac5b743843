import Logging

/// The addresses a Service is reached at, followed live: what the server's serving certificate must name, so
/// that switching the Service from LoadBalancer to ClusterIP (the source document's private-line step) is one
/// `kubectl patch svc` and nothing else. Its ClusterIPs, externalIPs and LoadBalancer ingress IPs and
/// hostnames; nothing when the Service is gone.
public struct ServiceAddresses: Sendable {
    public let watch: KubeWatch

    public init(client: KubeClient, namespace: String, name: String, logger: Logger) {
        watch = KubeWatch(
            client: client, path: "/api/v1/namespaces/\(namespace)/services", query: "fieldSelector=metadata.name%3D\(name)",
            what: "Service \(namespace)/\(name)", logger: logger)
    }

    /// Calls `onChange` with the Service's addresses on every change, until the task is cancelled.
    public func run(_ onChange: @escaping @Sendable (_ ips: [String], _ dnsNames: [String]) -> Void) async {
        await watch.run { change in
            switch change {
            case .listed(let items):
                let found = items.first.map(Self.addresses) ?? (ips: [], dnsNames: [])
                onChange(found.ips, found.dnsNames)
            case .added(let service), .modified(let service):
                let found = Self.addresses(of: service)
                onChange(found.ips, found.dnsNames)
            case .deleted:
                onChange([], [])
            }
        }
    }

    /// A Service object's addresses (`spec.clusterIP(s)` except `None`, `spec.externalIPs`,
    /// `status.loadBalancer.ingress[].ip` and `.hostname`), each once, in that order.
    public static func addresses(of service: [String: any Sendable]) -> (ips: [String], dnsNames: [String]) {
        let spec = service["spec"] as? [String: any Sendable] ?? [:]
        var ips = (spec["clusterIPs"] as? [String]) ?? [(spec["clusterIP"] as? String)].compactMap { $0 }
        ips += spec["externalIPs"] as? [String] ?? []
        var names: [String] = []
        let ingress = ((service["status"] as? [String: any Sendable])?["loadBalancer"] as? [String: any Sendable])?["ingress"]
        for entry in ingress as? [[String: any Sendable]] ?? [] {
            if let ip = entry["ip"] as? String { ips.append(ip) }
            if let hostname = entry["hostname"] as? String { names.append(hostname) }
        }
        var seen = Set<String>()
        return (ips.filter { $0 != "None" && !$0.isEmpty && seen.insert($0).inserted }, names.filter { seen.insert($0).inserted })
    }
}
