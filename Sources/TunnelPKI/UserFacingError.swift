/// An error an operator is shown as is: one line that names the file, flag or value at fault and why, never a
/// stack trace or a type name. ``PKIError``, `ConfigurationError` (TunnelSupport) and `PlanError` (EdgePlan)
/// conform; the `edgetunnel` CLI prints any of them the same way (`reportingErrors`).
///
/// Declared here, in the lowest module, so that every module's errors can conform.
public protocol UserFacingError: Error, CustomStringConvertible, Sendable {
    /// One line: the file, flag or value at fault and why.
    var message: String { get }
}

extension PKIError: UserFacingError {}
