import TunnelPKI

/// Bad input to the plan, doctor, manifests or probe commands: one line naming the value.
public struct PlanError: UserFacingError, Equatable {
    public let description: String
    public var message: String { description }
    public init(_ description: String) { self.description = description }
}
