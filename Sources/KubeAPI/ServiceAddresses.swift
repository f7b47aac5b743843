import Logging
import TunnelPKI

/// The addresses a Service is reached at, followed live: what the server's serving certificate must name, so
/// that switching the Service from LoadBalancer to ClusterIP (the source document's private-line step) is one
/// `kubectl patch svc` and nothing else. Its ClusterIPs, externalIPs and LoadBalancer ingress IPs and
/// hostnames; nothing when the Service is gone.
public struct ServiceAddresses: Sendable {
    public let watch: KubeWatch

    public init(client: KubeClient, namespace: String, name: String, logger: Logger) {
        watch = KubeWatch(
            client: client, path: "/api/v1/namespaces/\(namespace)/services",
            query: "fieldSelector=metadata.name%3D\(name)",
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
        let ingress = ((service["status"] as? [String: any Sendable])?["loadBalancer"] as? [String: any Sendable])?[
            "ingress"]
        for entry in ingress as? [[String: any Sendable]] ?? [] {
            if let ip = entry["ip"] as? String { ips.append(ip) }
            if let hostname = entry["hostname"] as? String { names.append(hostname) }
        }
        var seen = Set<String>()
        return (
            ips.filter { $0 != "None" && !$0.isEmpty && seen.insert($0).inserted },
            names.filter { seen.insert($0).inserted }
        )
    }

    // MARK: What the certificate may name

    /// The most addresses (IPs and DNS names together) one Service may put into the serving certificate. Each is
    /// a SAN sent in every handshake, and TLS libraries refuse a certificate chain over their size limit
    /// (OpenSSL's and BoringSSL's default is 100 KiB: some thousands of names). A Service is reached at its
    /// ClusterIPs, a few externalIPs and its load balancer's addresses, far fewer. A Service with more (thousands
    /// of externalIPs, written by whoever may edit it) is refused as a whole: the certificate in force stays.
    public static let maxAddresses = 100

    /// A Service's addresses as the serving certificate may name them.
    public struct Checked: Sendable, Equatable {
        /// IP addresses, in their canonical text form (`fd00::1`), each once.
        public var ips: [String]
        /// DNS names (RFC 1123, lower case, no wildcard), each once.
        public var dnsNames: [String]
        /// The entries left out: neither an IP address nor a DNS name a certificate may carry.
        public var invalid: [String]

        public init(ips: [String], dnsNames: [String], invalid: [String]) {
            self.ips = ips
            self.dnsNames = dnsNames
            self.invalid = invalid
        }

        /// How many SANs the Service adds.
        public var count: Int { ips.count + dnsNames.count }
    }

    /// Checks a Service's addresses before anything is kept of them: IPs must parse as IPv4 or IPv6 addresses,
    /// names must be valid DNS names (taken in lower case). A wildcard (`*`, `*.example.com`) is no address of a
    /// Service and is left out: whoever may edit a Service (its `status.loadBalancer`, written by a controller)
    /// must not obtain a certificate for every name under a domain. What is left out is listed in
    /// ``Checked/invalid``, so that the caller can name it; the rest still counts, so one bad entry cannot keep
    /// the certificate from following the Service's other addresses.
    public static func check(ips: [String], dnsNames: [String]) -> Checked {
        var checked = Checked(ips: [], dnsNames: [], invalid: [])
        var seen = Set<String>()
        for text in ips {
            // Only the textual forms inet_pton takes, without brackets: a Service never writes `[fd00::1]`.
            guard !text.hasPrefix("["), let address = IPAddress(text) else {
                checked.invalid.append(text)
                continue
            }
            if seen.insert(address.description).inserted { checked.ips.append(address.description) }
        }
        for text in dnsNames {
            // DNS compares names without case; the certificate carries them in lower case.
            let name = text.lowercased()
            guard DNSName.isValid(name, allowWildcard: false) else {
                checked.invalid.append(text)
                continue
            }
            if seen.insert(name).inserted { checked.dnsNames.append(name) }
        }
        return checked
    }
}
