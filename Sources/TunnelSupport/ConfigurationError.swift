import TunnelPKI

/// A flag, config-file value or command-line argument that cannot be used: one line naming it and what it must
/// be (`invalid --server-id "a b": must be ...`). Printed as is, and the process exits with it at start; at a
/// reload the last good configuration stays.
public struct ConfigurationError: UserFacingError, Hashable {
    public let description: String
    public var message: String { description }

    public init(_ message: String) {
        // One line, whatever an underlying library put into its own description.
        description = message.split(whereSeparator: \.isNewline).joined(separator: " ")
    }
}
