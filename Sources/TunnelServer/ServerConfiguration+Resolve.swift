import Logging
import TunnelPKI
import TunnelSupport

extension ServerConfiguration {
    /// The server's configuration from command-line flags over a configuration file: a value given as a flag wins,
    /// then the file's, then the default. Every value is checked here, and a bad one is a ``ConfigurationError``
    /// that names its flag, so the binary, the reloader, the unit tests and the config fuzzer share one path.
    public static func resolve(
        flags: ServerConfigFile, file: ServerConfigFile
    ) throws -> (
        ServerConfiguration, Logger.Level
    ) {
        var configuration = ServerConfiguration()
        configuration.pkiDirectory = flags.pkiDir ?? file.pkiDir ?? configuration.pkiDirectory
        configuration.caDirectory = flags.caDir ?? file.caDir
        configuration.stateDirectory = flags.stateDir ?? file.stateDir
        configuration.bindAddress = flags.bindAddress ?? file.bindAddress ?? configuration.bindAddress
        configuration.tunnelPort = try port(
            flags.tunnelPort ?? file.tunnelPort ?? configuration.tunnelPort, "tunnel-port")
        configuration.securePort = try port(
            flags.securePort ?? file.securePort ?? configuration.securePort, "secure-port")
        configuration.metaPort = try port(flags.metaPort ?? file.metaPort ?? configuration.metaPort, "meta-port")
        configuration.insecurePort = try port(
            flags.insecurePort ?? file.insecurePort ?? configuration.insecurePort, "insecure-port")
        configuration.insecureBindAddress =
            flags.insecureBindAddress ?? file.insecureBindAddress ?? configuration.insecureBindAddress
        configuration.udsPath = flags.udsPath ?? file.udsPath
        configuration.grpcUdsPath = flags.grpcUdsPath ?? file.grpcUdsPath
        if let grpc = configuration.grpcUdsPath, grpc == configuration.udsPath {
            throw ConfigurationError(
                "--grpc-uds-path \(grpc) is also --uds-path: give each frontend a socket of its own")
        }
        configuration.kubeletClientCert = flags.kubeletClientCert ?? file.kubeletClientCert
        configuration.kubeletClientKey = flags.kubeletClientKey ?? file.kubeletClientKey
        configuration.kubeletCAFile = flags.kubeletCAFile ?? file.kubeletCAFile
        configuration.certIPs = flags.certIPs ?? file.certIPs ?? []
        configuration.certDNSNames = flags.certDNSNames ?? file.certDNSNames ?? []
        configuration.clientCAFile = flags.clientCAFile ?? file.clientCAFile
        configuration.serverID = flags.serverID ?? file.serverID ?? configuration.serverID
        // Agents read it in a line before TLS (ReplicaProbe) and it names the replica's Lease: a pod name.
        guard (1...253).contains(configuration.serverID.utf8.count),
            configuration.serverID.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-._".contains($0)) })
        else {
            throw ConfigurationError(
                "invalid --server-id \"\(configuration.serverID)\": must be 1-253 letters, digits, '-', '.' or '_'")
        }
        if let count = flags.serverCount ?? file.serverCount {
            guard (1...1000).contains(count) else {
                throw ConfigurationError("invalid --server-count \(count): must be 1-1000")
            }
            configuration.serverCount = count
        }
        configuration.leaseNamespace = flags.leaseNamespace ?? file.leaseNamespace
        configuration.kubeconfig = flags.kubeconfig ?? file.kubeconfig
        configuration.checkNodeObjects = flags.checkNodeObjects ?? file.checkNodeObjects ?? false
        if let key = flags.poolLabel ?? file.poolLabel {
            guard PoolName.isLabelKey(key) else {
                throw ConfigurationError(
                    "invalid --pool-label \"\(key)\": must be a label key such as apps.openyurt.io/nodepool")
            }
            configuration.poolLabel = key
        }
        if let namespace = flags.joinStateNamespace ?? file.joinStateNamespace {
            guard DNSName.isValid(namespace), !namespace.contains(".") else {
                throw ConfigurationError("invalid --join-state-namespace \"\(namespace)\": must be a namespace name")
            }
            configuration.joinStateNamespace = namespace
        }
        for service in ProcessSupport.splitList((flags.addressService ?? file.addressService).map { [$0] } ?? []) {
            let parts = service.split(separator: "/", omittingEmptySubsequences: false)
            guard parts.count == 2,
                parts.allSatisfy({
                    !$0.isEmpty && $0.allSatisfy { $0.isLowercase || $0.isNumber || $0 == "-" || $0 == "." }
                })
            else { throw ConfigurationError("invalid --address-service \"\(service)\": must be namespace/name") }
            if !configuration.addressServices.contains(service) { configuration.addressServices.append(service) }
        }
        if let label = flags.leaseLabel ?? file.leaseLabel {
            let parts = label.split(separator: "=", omittingEmptySubsequences: false)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty,
                label.allSatisfy({ $0.isLetter || $0.isNumber || "-_./=".contains($0) })
            else { throw ConfigurationError("invalid --lease-label \"\(label)\": must be key=value") }
            configuration.leaseLabel = label
        }
        if let seconds = try durationSeconds(
            flags.replicaWarmup ?? file.replicaWarmup, "replica-warmup", within: 0...3600, "between 0s and 1h")
        {
            configuration.replicaWarmup = .milliseconds(Int64(seconds * 1000))
        }
        if let threads = flags.eventLoopThreads ?? file.eventLoopThreads {
            guard (1...256).contains(threads) else {
                throw ConfigurationError("invalid --event-loop-threads \(threads): must be 1-256")
            }
            configuration.eventLoopThreads = threads
        }
        if let seconds = try durationSeconds(
            flags.handshakeTimeout ?? file.handshakeTimeout, "handshake-timeout", within: 1...300, "between 1s and 300s"
        ) {
            configuration.handshakeTimeout = .milliseconds(Int64(seconds * 1000))
        }
        if let total = flags.maxPendingConnections ?? file.maxPendingConnections {
            guard total >= 1 else {
                throw ConfigurationError("invalid --max-pending-connections \(total): must be at least 1")
            }
            configuration.maxPendingConnections = total
        }
        if let perSource = flags.maxPendingConnectionsPerSource ?? file.maxPendingConnectionsPerSource {
            guard perSource >= 1 else {
                throw ConfigurationError(
                    "invalid --max-pending-connections-per-source \(perSource): must be at least 1")
            }
            configuration.maxPendingConnectionsPerSource = perSource
        }
        configuration.allowInsecureBind = flags.allowInsecureBind ?? file.allowInsecureBind ?? false
        func positive(_ value: Int?, _ flag: String) throws -> Int? {
            guard let value else { return nil }
            guard value >= 1 else { throw ConfigurationError("invalid --\(flag) \(value): must be at least 1") }
            return value
        }
        if let value = flags.resumeGraceSeconds ?? file.resumeGraceSeconds {
            guard (0...600).contains(value) else {
                throw ConfigurationError("invalid --resume-grace-seconds \(value): must be between 0 and 600")
            }
            configuration.resumeGrace = .seconds(Int64(value))
        }
        if let value = try positive(flags.maxStreamsPerAgent ?? file.maxStreamsPerAgent, "max-streams-per-agent") {
            configuration.maxStreamsPerAgent = value
        }
        if let value = try positive(
            flags.maxPendingOpensPerAgent ?? file.maxPendingOpensPerAgent, "max-pending-opens-per-agent")
        {
            configuration.maxPendingOpensPerAgent = value
        }
        if let value = try positive(flags.maxStreamsPerCaller ?? file.maxStreamsPerCaller, "max-streams-per-caller") {
            configuration.maxStreamsPerCaller = value
        }
        if let value = try positive(flags.maxBufferedMiB ?? file.maxBufferedMiB, "max-buffered-mib") {
            guard value <= 1 << 20 else { throw ConfigurationError("invalid --max-buffered-mib \(value): too large") }
            configuration.maxBufferedBytes = value << 20
        }
        if let seconds = try durationSeconds(
            flags.agentCertificateValidity ?? file.agentCertificateValidity, "agent-certificate-validity",
            within: 10...Double.infinity, "at least 10s")
        {
            configuration.agentCertificateValidity = seconds
        }
        if let seconds = try durationSeconds(
            flags.servingCertificateValidity ?? file.servingCertificateValidity, "serving-certificate-validity",
            within: 10...Double.infinity, "at least 10s")
        {
            configuration.servingCertificateValidity = seconds
        }
        let levelText = flags.logLevel ?? file.logLevel ?? "info"
        guard let level = Logger.Level(flag: levelText) else {
            throw ConfigurationError("invalid --log-level \"\(levelText)\"")
        }
        // Check addresses now, so a typo is reported as such rather than as a certificate problem.
        do {
            _ = try ServerSANs(ips: configuration.certIPs, dnsNames: configuration.certDNSNames)
        } catch {
            throw ConfigurationError("invalid --cert-ips or --cert-dns-names: \(error)")
        }
        return (configuration, level)
    }

    /// The seconds duration flag `--flag` gives, if it is set: one of `Durations`' forms, within `range` (`rule` says
    /// the range in the error's words).
    private static func durationSeconds(
        _ text: String?, _ flag: String, within range: ClosedRange<Double>, _ rule: String
    ) throws -> Double? {
        guard let text else { return nil }
        let seconds = try Durations.parse(text, what: "--\(flag)")
        guard range.contains(seconds) else { throw ConfigurationError("--\(flag) must be \(rule)") }
        return seconds
    }

    private static func port(_ value: Int, _ name: String) throws -> Int {
        guard (0...65535).contains(value) else {
            throw ConfigurationError("invalid --\(name) \(value): must be 0-65535")
        }
        return value
    }
}
