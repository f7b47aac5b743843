import TunnelPKI
import Yams

/// An edge node pool: the nodes of one kind of site, reached over the private line or over the internet
/// (from Kubernetes 1.22 the source document's route to a private line is such a pool).
///
/// On the command line `--pool NAME=express-connect|internet[,cidr=CIDR]...[,selector=KEY=VALUE |
/// ,selector-style=openyurt|ack]`; in the plan file a list under `pools:` of `{name, connectivity, cidrs,
/// nodeSelector | selectorStyle}`.
public struct EdgePool: Codable, Sendable, Equatable {
    /// Where the default node selector comes from: OpenYurt's node-pool label or ACK's node-pool id.
    public enum SelectorStyle: String, Codable, Sendable, CaseIterable {
        case openyurt, ack

        public var labelKey: String {
            switch self {
            case .openyurt: "apps.openyurt.io/nodepool"
            case .ack: "alibabacloud.com/nodepool-id"
            }
        }
    }

    /// A DNS label of at most ``maxNameLength`` characters: it names the pool's DaemonSet, ConfigMap and Secret.
    public var name: String
    public var connectivity: Connectivity
    /// The pool's edge networks: its security-group rules, and the node IPs its bootstrap token admits.
    public var cidrs: [CIDR]
    /// The labels that select the pool's nodes (all must match).
    public var nodeSelector: [String: String]

    /// `edge-tunnel-bootstrap-` + the name stays a 63-character label.
    public static let maxNameLength = 40
    public static let maxPools = 64
    public static let maxCIDRs = 64

    public init(name: String, connectivity: Connectivity, cidrs: [CIDR] = [], nodeSelector: [String: String]? = nil) {
        self.name = name
        self.connectivity = connectivity
        self.cidrs = cidrs
        self.nodeSelector = nodeSelector ?? [SelectorStyle.openyurt.labelKey: name]
    }

    /// The node selector as `key=value` pairs, sorted by key.
    public var selectorText: String {
        nodeSelector.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
    }

    // MARK: Parsing

    /// One `--pool` flag: `NAME=CONNECTIVITY` and then `key=value` items, comma-separated.
    public init(flag: String) throws {
        let items = flag.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let head = items[0].split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
        func fail(_ pool: String, _ message: String) -> PlanError {
            PlanError("invalid --pool \"\(flag.prefix(200))\": \(pool.isEmpty ? "" : "pool \(pool): ")\(message)")
        }
        guard head.count == 2 else {
            throw fail(
                "", "expected NAME=express-connect or NAME=internet first, then cidr=, selector= or selector-style=")
        }
        let name = head[0]
        var builder = Builder(name: name, fail: { fail(name, $0) })
        try builder.setName(name)
        try builder.setConnectivity(head[1], key: "connectivity")
        for item in items.dropFirst() {
            let pair = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            guard pair.count == 2 else {
                throw fail(name, "\"\(item.prefix(100))\" is not key=value (keys: cidr, selector, selector-style)")
            }
            switch pair[0] {
            case "cidr": try builder.addCIDR(pair[1], key: "cidr")
            case "selector":
                let selector = pair[1].split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(
                    String.init)
                guard selector.count == 2 else {
                    throw fail(name, "selector \"\(pair[1].prefix(100))\" is not KEY=VALUE")
                }
                try builder.addSelector(selector[0], selector[1], key: "selector")
            case "selector-style": try builder.setStyle(pair[1], key: "selector-style")
            default:
                throw fail(name, "unknown key \"\(pair[0].prefix(40))\" (keys: cidr, selector, selector-style)")
            }
        }
        self = try builder.pool()
    }

    /// One entry of `pools:` in a plan file, as a YAML node; `index` counts from 0.
    static func parse(yaml node: Node, index: Int) throws -> EdgePool {
        let place = "pools[\(index)]"
        guard case .mapping(let mapping) = node else {
            throw PlanError(
                "\(place): expected a mapping with name, connectivity, cidrs and nodeSelector or selectorStyle")
        }
        var fields: [String: Node] = [:]
        for (key, value) in mapping {
            guard let key = key.scalar?.string else { throw PlanError("\(place): a key is not a string") }
            fields[key] = value
        }
        guard let nameNode = fields["name"] else { throw PlanError("\(place): name is missing") }
        guard let name = nameNode.scalar?.string else { throw PlanError("\(place): name must be a string") }
        let label = "\(place) (pool \(name.prefix(64)))"
        var builder = Builder(name: name, fail: { PlanError("\(label): \($0)") })
        try builder.setName(name)
        for key in fields.keys.sorted()
        where !["name", "connectivity", "cidrs", "nodeSelector", "selectorStyle"].contains(key) {
            throw PlanError(
                "\(label): unknown key \"\(key.prefix(40))\" (keys: name, connectivity, cidrs, nodeSelector, selectorStyle)"
            )
        }
        guard let connectivity = fields["connectivity"] else { throw PlanError("\(label): connectivity is missing") }
        guard let text = connectivity.scalar?.string else { throw PlanError("\(label): connectivity must be a string") }
        try builder.setConnectivity(text, key: "connectivity")
        switch fields["cidrs"] {
        case nil: break
        case .scalar(let scalar)?: try builder.addCIDR(scalar.string, key: "cidrs")
        case .sequence(let sequence)?:
            for item in sequence {
                guard let text = item.scalar?.string else { throw PlanError("\(label): cidrs must be a list of CIDRs") }
                try builder.addCIDR(text, key: "cidrs")
            }
        default: throw PlanError("\(label): cidrs must be a list of CIDRs")
        }
        if let selector = fields["nodeSelector"] {
            guard case .mapping(let pairs) = selector, !pairs.isEmpty else {
                throw PlanError(
                    "\(label): nodeSelector must be a mapping of labels, e.g. {apps.openyurt.io/nodepool: \(name.prefix(64))}"
                )
            }
            for (key, value) in pairs {
                guard let key = key.scalar?.string, let value = value.scalar?.string else {
                    throw PlanError("\(label): nodeSelector must map label keys to string values")
                }
                try builder.addSelector(key, value, key: "nodeSelector")
            }
        }
        if let style = fields["selectorStyle"] {
            guard let text = style.scalar?.string else {
                throw PlanError("\(label): selectorStyle must be openyurt or ack")
            }
            try builder.setStyle(text, key: "selectorStyle")
        }
        return try builder.pool()
    }

    /// Checks a set of pools: distinct names, distinct node selectors, within the limits.
    public static func validate(_ pools: [EdgePool]) throws {
        guard pools.count <= maxPools else { throw PlanError("\(pools.count) pools: at most \(maxPools)") }
        var names: Set<String> = []
        var selectors: [String: String] = [:]
        for pool in pools {
            guard names.insert(pool.name).inserted else {
                throw PlanError("pool \(pool.name): the name is given twice")
            }
            if let other = selectors[pool.selectorText] {
                throw PlanError(
                    "pools \(other) and \(pool.name) have the same node selector \(pool.selectorText): "
                        + "a node belongs to one pool, and one agent runs on it")
            }
            selectors[pool.selectorText] = pool.name
        }
    }

    /// Collects one pool's values and checks each where it is given, so that an error names the key.
    struct Builder {
        var name: String
        var fail: (String) -> PlanError
        var connectivity: Connectivity?
        var cidrs: [CIDR] = []
        var selector: [String: String] = [:]
        var style: SelectorStyle?
        var selectorKey: String?
        var styleKey: String?

        init(name: String, fail: @escaping (String) -> PlanError) {
            self.name = name
            self.fail = fail
        }

        mutating func setName(_ name: String) throws {
            guard EdgePool.isValidName(name) else {
                throw fail(
                    "name \"\(name.prefix(64))\" must be a DNS label: lower-case letters, digits and '-', "
                        + "starting and ending with a letter or digit, at most \(EdgePool.maxNameLength) characters")
            }
        }

        mutating func setConnectivity(_ text: String, key: String? = nil) throws {
            guard let value = Connectivity(rawValue: text.lowercased()) else {
                throw fail(
                    "\(key.map { "\($0) " } ?? "")\"\(text.prefix(40))\" is not a connectivity: use express-connect or internet"
                )
            }
            connectivity = value
        }

        mutating func addCIDR(_ text: String, key: String) throws {
            guard let cidr = try? CIDR(parsing: text) else {
                throw fail("\(key) \"\(text.prefix(64))\" is not a CIDR such as 10.20.0.0/16")
            }
            guard cidrs.count < EdgePool.maxCIDRs else { throw fail("\(key): at most \(EdgePool.maxCIDRs) CIDRs") }
            if !cidrs.contains(cidr) { cidrs.append(cidr) }
        }

        mutating func addSelector(_ label: String, _ value: String, key: String) throws {
            guard Labels.isValidKey(label) else {
                throw fail(
                    "\(key) label key \"\(label.prefix(80))\" is not a Kubernetes label key (e.g. apps.openyurt.io/nodepool)"
                )
            }
            guard Labels.isValidValue(value) else {
                throw fail(
                    "\(key) value \"\(value.prefix(80))\" of \(label) is not a Kubernetes label value "
                        + "(at most 63 letters, digits, '-', '_', '.', starting and ending alphanumeric)")
            }
            guard selector[label] == nil else { throw fail("\(key) \(label) is given twice") }
            if let styleKey { throw fail("\(key) and \(styleKey) both given: choose one") }
            selector[label] = value
            selectorKey = key
        }

        mutating func setStyle(_ text: String, key: String) throws {
            guard let value = SelectorStyle(rawValue: text.lowercased()) else {
                throw fail("\(key) \"\(text.prefix(40))\" is not openyurt or ack")
            }
            if let selectorKey { throw fail("\(selectorKey) and \(key) both given: choose one") }
            style = value
            styleKey = key
        }

        func pool() throws -> EdgePool {
            guard let connectivity else { throw fail("connectivity is missing") }
            let nodeSelector = selector.isEmpty ? [(style ?? .openyurt).labelKey: name] : selector
            return EdgePool(name: name, connectivity: connectivity, cidrs: cidrs, nodeSelector: nodeSelector)
        }
    }

    /// A DNS label (RFC 1123) of at most ``maxNameLength`` characters.
    public static func isValidName(_ name: String) -> Bool {
        (1...maxNameLength).contains(name.utf8.count) && !name.contains(".") && DNSName.isValid(name)
    }
}

/// Kubernetes' rules for label keys and values (`[prefix/]name`).
enum Labels {
    static func isValidKey(_ key: String) -> Bool {
        let parts = key.split(separator: "/", omittingEmptySubsequences: false)
        switch parts.count {
        case 1: return isValidName(parts[0])
        case 2: return DNSName.isValid(String(parts[0])) && isValidName(parts[1])
        default: return false
        }
    }

    static func isValidValue(_ value: String) -> Bool { value.isEmpty || isValidName(Substring(value)) }

    /// 1–63 characters of `[A-Za-z0-9-_.]`, alphanumeric at both ends.
    static func isValidName(_ name: Substring) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...63).contains(bytes.count) else { return false }
        func alphanumeric(_ b: UInt8) -> Bool {
            (b >= UInt8(ascii: "a") && b <= UInt8(ascii: "z")) || (b >= UInt8(ascii: "A") && b <= UInt8(ascii: "Z"))
                || (b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9"))
        }
        guard alphanumeric(bytes[0]), alphanumeric(bytes[bytes.count - 1]) else { return false }
        return bytes.allSatisfy {
            alphanumeric($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".")
        }
    }
}
