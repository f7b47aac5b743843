/// An error from the tunnel PKI: what went wrong, with a one-line message that names the file or value.
///
/// Errors are structs with a ``Code`` (as in swift-nio-ssh's `NIOSSHError`) so that callers can react to
/// the kind of failure without matching on strings, and a message that is safe to print as is.
public struct PKIError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The kind of failure.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Base: String, Hashable, Sendable {
            case fileMissing, fileUnreadable, invalidPEM, keyMismatch, notACertificateAuthority
            case certificateExpired, certificateNotYetValid, invalidIPAddress, invalidDNSName
            case invalidNodeName, invalidToken, tokenNotFound, tokenExpired, alreadyExists
            case invalidCSR, writeFailed, invalidDuration, invalidCAHash, invalidArgument
        }
        private let base: Base
        private init(_ base: Base) { self.base = base }

        public static let fileMissing = Code(.fileMissing)
        public static let fileUnreadable = Code(.fileUnreadable)
        public static let invalidPEM = Code(.invalidPEM)
        public static let keyMismatch = Code(.keyMismatch)
        public static let notACertificateAuthority = Code(.notACertificateAuthority)
        public static let certificateExpired = Code(.certificateExpired)
        public static let certificateNotYetValid = Code(.certificateNotYetValid)
        public static let invalidIPAddress = Code(.invalidIPAddress)
        public static let invalidDNSName = Code(.invalidDNSName)
        public static let invalidNodeName = Code(.invalidNodeName)
        public static let invalidToken = Code(.invalidToken)
        public static let tokenNotFound = Code(.tokenNotFound)
        public static let tokenExpired = Code(.tokenExpired)
        public static let alreadyExists = Code(.alreadyExists)
        public static let invalidCSR = Code(.invalidCSR)
        public static let writeFailed = Code(.writeFailed)
        public static let invalidDuration = Code(.invalidDuration)
        public static let invalidCAHash = Code(.invalidCAHash)
        public static let invalidArgument = Code(.invalidArgument)

        public var description: String { base.rawValue }
    }

    public let code: Code
    /// One line, naming the file or value at fault and why.
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        // One line, whatever an underlying library put into its own description.
        self.message = message.split(whereSeparator: \.isNewline).joined(separator: " ")
    }

    public var description: String { message }
}
