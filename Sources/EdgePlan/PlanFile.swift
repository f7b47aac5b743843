import TunnelSupport
import Yams

/// The YAML file `edgetunnel plan --file` (and `manifests --file`) reads: the plan's inputs under the flags' names
/// in camelCase, and the edge node pools under `pools:`. Every field is optional; flags win over the file.
public struct PlanFile: Decodable, Sendable {
    public var connectivity: String?
    public var internetEgress: Bool?
    public var publicAPIServer: Bool?
    public var kubernetesVersion: String?
    public var existingCluster: Bool?
    public var hasEIP: Bool?
    public var edgeCIDRs: [String]?
    public var cloudEdgeContainerNetwork: Bool?
    /// `pools:` — a list of `{name, connectivity, cidrs, nodeSelector | selectorStyle}` (``EdgePool``).
    public var pools: [EdgePool]?

    enum CodingKeys: String, CodingKey {
        case connectivity, internetEgress, publicAPIServer, kubernetesVersion, existingCluster, hasEIP, edgeCIDRs
        case cloudEdgeContainerNetwork
    }

    public init() {}

    /// Decodes the text of a plan file, or throws one line naming `path` (and, for a pool, the pool and its key).
    public static func parse(_ text: String, path: String) throws -> PlanFile {
        var file: PlanFile
        do {
            // Composed safely first: no alias bomb or non-string key reaches the decoder.
            _ = try SafeYAML.load(text)
            file = try YAMLDecoder().decode(PlanFile.self, from: text)
        } catch {
            throw PlanError("\(path): not a plan input file (\(String(describing: error).prefix(120)))")
        }
        guard case .mapping(let root)? = try? Yams.compose(yaml: text),
            let poolsNode = root.first(where: { $0.key.scalar?.string == "pools" })?.value
        else { return file }
        guard case .sequence(let list) = poolsNode else {
            throw PlanError("\(path): pools must be a list of {name, connectivity, cidrs, nodeSelector}")
        }
        guard list.count <= EdgePool.maxPools else {
            throw PlanError("\(path): \(list.count) pools: at most \(EdgePool.maxPools)")
        }
        do {
            let pools = try list.enumerated().map { try EdgePool.parse(yaml: $0.element, index: $0.offset) }
            try EdgePool.validate(pools)
            file.pools = pools
        } catch let error as PlanError {
            throw PlanError("\(path): \(error.description)")
        }
        return file
    }
}
