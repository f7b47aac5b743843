import Yams

/// The YAML file `edgetunnel plan --file` reads: the plan's inputs under the flags' names in camelCase.
/// Every field is optional; flags win over the file.
public struct PlanFile: Decodable, Sendable {
    public var connectivity: String?
    public var internetEgress: Bool?
    public var publicAPIServer: Bool?
    public var kubernetesVersion: String?
    public var existingCluster: Bool?
    public var hasEIP: Bool?
    public var edgeCIDRs: [String]?
    public var cloudEdgeContainerNetwork: Bool?

    public init() {}

    /// Decodes the text of a plan file, or throws one line naming `path`.
    public static func parse(_ text: String, path: String) throws -> PlanFile {
        do {
            return try YAMLDecoder().decode(PlanFile.self, from: text)
        } catch {
            throw PlanError("\(path): not a plan input file (\(String(describing: error).prefix(120)))")
        }
    }
}
