/// Bad input to the plan, doctor, manifests or probe commands: one line naming the value.
public struct PlanError: Error, CustomStringConvertible, Equatable, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
