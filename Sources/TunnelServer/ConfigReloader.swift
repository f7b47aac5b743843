import Foundation
import Logging
import TunnelPKI

/// Re-reads the config file when its contents change (polled every 2 s, which also catches a Kubernetes
/// ConfigMap's symlink swap) or on SIGHUP, and applies the new address set live. A file that does not parse
/// is rejected with a logged error; the server keeps the last good configuration.
public final class ConfigReloader: @unchecked Sendable {
    /// The file's settings merged with the command line's (a flag wins over the file), validated.
    public typealias Resolve = @Sendable (ServerConfigFile) throws -> ServerConfiguration
    let path: String
    let server: TunnelServer
    let logger: Logger
    private let resolve: Resolve
    private let lock = NSLock()
    private var lastContents: [UInt8]?
    private var applied: ServerConfiguration

    public init(path: String, server: TunnelServer, logger: Logger, resolve: @escaping Resolve) {
        self.resolve = resolve
        self.path = path
        self.server = server
        self.logger = logger
        self.applied = server.configuration
        self.lastContents = try? AtomicFile.read(path)
    }

    public func watch() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(2))
            guard let contents = try? AtomicFile.read(path) else { continue }
            let changed = lock.withLock { contents != lastContents }
            if changed { reload(reason: "\(path) changed") }
        }
    }

    public func reload(reason: String) {
        lock.lock()
        defer { lock.unlock() }
        do {
            let contents = try AtomicFile.read(path)
            lastContents = contents
            let next = try resolve(try ServerConfigFile.load(path: path))
            if next.tunnelPort != applied.tunnelPort || next.securePort != applied.securePort
                || next.metaPort != applied.metaPort || next.bindAddress != applied.bindAddress
                || next.pkiDirectory != applied.pkiDirectory || next.clientCAFile != applied.clientCAFile
                || next.caDirectory != applied.caDirectory || next.stateDirectory != applied.stateDirectory
                || next.joinStateNamespace != applied.joinStateNamespace || next.poolLabel != applied.poolLabel
            {
                logger.warning(
                    "\(reason): ports, bind address, PKI, CA and state folders, join state, pool label and client CA change only with a restart; applying the addresses"
                )
            }
            try server.updateAddresses(certIPs: next.certIPs, certDNSNames: next.certDNSNames)
            // With Leases the count is theirs: the file's serverCount only stands in until the first list.
            if next.leaseNamespace == nil { server.setServerCount(next.serverCount) }
            applied = next
            logger.info(
                "\(reason): configuration applied",
                metadata: [
                    "certIPs": "\(next.certIPs.joined(separator: ","))",
                    "certDNSNames": "\(next.certDNSNames.joined(separator: ","))",
                ])
        } catch {
            logger.error("\(reason): configuration rejected, keeping the last good one: \(error)")
        }
    }
}
