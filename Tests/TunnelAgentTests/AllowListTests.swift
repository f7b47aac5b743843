import Logging
import Testing
import TunnelPKI
import TunnelSupport

@testable import TunnelAgent

@Suite struct AllowListTests {
    func list(_ rules: String...) throws -> AllowList {
        AllowList(rules: try rules.map { try AllowList.Rule(parsing: $0) })
    }

    @Test func defaultAllowsOnlyKubeletPortsOnLoopbackAndNodeIPs() {
        let allow = AllowList.kubeletDefault(nodeIPs: [IPAddress("10.0.3.7")!])
        #expect(allow.allows(host: "127.0.0.1", port: 10250))
        #expect(allow.allows(host: "127.0.0.1", port: 10255))
        #expect(allow.allows(host: "::1", port: 10250))
        #expect(allow.allows(host: "10.0.3.7", port: 10250))
        #expect(!allow.allows(host: "10.0.3.8", port: 10250))
        #expect(!allow.allows(host: "127.0.0.1", port: 22))
        #expect(!allow.allows(host: "metadata.internal", port: 10250))
    }

    @Test func cidrsAndPortRanges() throws {
        let allow = try list("10.0.0.0/8:9100", "192.168.1.0/24:30000-32767", "[fd00::/8]:10250")
        #expect(allow.allows(host: "10.255.1.2", port: 9100))
        #expect(!allow.allows(host: "11.0.0.1", port: 9100))
        #expect(allow.allows(host: "192.168.1.77", port: 31000))
        #expect(!allow.allows(host: "192.168.2.77", port: 31000))
        #expect(!allow.allows(host: "192.168.1.77", port: 29999))
        #expect(allow.allows(host: "fd12::5", port: 10250))
        #expect(!allow.allows(host: "fe80::1", port: 10250))
    }

    @Test func hostNamesMatchExactlyAndNeverByAddress() throws {
        let allow = try list("prometheus.monitoring.svc:9090")
        #expect(allow.allows(host: "prometheus.monitoring.svc", port: 9090))
        #expect(allow.allows(host: "PROMETHEUS.monitoring.svc", port: 9090))
        #expect(!allow.allows(host: "prometheus.monitoring.svc", port: 9091))
        #expect(!allow.allows(host: "evil.prometheus.monitoring.svc", port: 9090))
    }

    @Test(arguments: [
        "10.0.0.1", "10.0.0.1:", "10.0.0.1:0", "10.0.0.1:70000", "10.0.0.0/33:80", "10.0.0.1:90-80",
        "[fd00::1:80", "bad_host:80", "10.0.0.1:http",
    ])
    func malformedRulesAreNamed(_ text: String) {
        let error = #expect(throws: ConfigurationError.self) { try AllowList.Rule(parsing: text) }
        #expect(error?.description.contains("\"\(text)\"") == true)
    }

    @Test func rulesPrintAsTheyParse() throws {
        #expect(
            try list("10.0.0.0/8:9100-9200", "[fd00::1]:10250", "127.0.0.1:10250").description
                == "10.0.0.0/8:9100-9200, [fd00::1]:10250, 127.0.0.1:10250")
    }
}

@Suite struct ServerAddressTests {
    @Test func parsesHostsIPsAndBracketedIPv6() throws {
        #expect(try ServerAddress(parsing: "tunnel.example.com:10262").host == "tunnel.example.com")
        #expect(try ServerAddress(parsing: "[fd00::1]:10262").host == "fd00::1")
        #expect(try ServerAddress(parsing: "10.0.0.5:10262").isIP)
        for bad in ["tunnel", "tunnel:", ":10262", "tunnel:99999", "bad host:1"] {
            #expect(throws: ConfigurationError.self) { try ServerAddress(parsing: bad) }
        }
    }
}

@Suite struct BackoffTests {
    @Test func fullJitterStaysUnderTheCappedExponentialCeiling() async throws {
        var configuration = AgentConfiguration(nodeName: "edge-1", serverAddresses: ["127.0.0.1:1"])
        configuration.backoffInitial = .milliseconds(500)
        configuration.backoffCap = .seconds(30)
        let agent = try EdgeTunnelAgent(configuration: configuration, logger: .init(label: "test"))
        for attempt in 1...12 {
            let ceiling = min(30_000_000_000, 500_000_000 << attempt)
            let delays = (0..<200).map { _ in agent.backoff(attempt: attempt).nanoseconds }
            #expect(delays.allSatisfy { $0 >= 0 && $0 <= ceiling })
            // Full jitter: spread over the whole range, not clustered at the ceiling.
            #expect(delays.min()! < ceiling / 4 && delays.max()! > ceiling * 3 / 4)
        }
        await agent.stop()
        await agent.shutdown()
    }
}

@Suite struct AllowListHostileTargetTests {
    func list(_ rules: String...) throws -> AllowList {
        AllowList(rules: try rules.map { try AllowList.Rule(parsing: $0) })
    }

    @Test func aBroadIPv6RuleDoesNotLetIPv4MappedAddressesThrough() throws {
        let allow = try list("[::/0]:10250")
        #expect(allow.allows(host: "fd00::7", port: 10250))
        #expect(!allow.allows(host: "::ffff:169.254.169.254", port: 10250))
        #expect(!allow.allows(host: "::ffff:127.0.0.1", port: 10250))
        #expect(!allow.allows(host: "64:ff9b::169.254.169.254", port: 10250))  // NAT64
        // An IPv4 rule still covers the mapped spelling of its addresses.
        #expect(try list("10.0.0.0/8:10250").allows(host: "::ffff:10.1.2.3", port: 10250))
    }

    @Test func aNameMustNotResolveToLoopbackOrTheMetadataAddress() throws {
        let allow = try list("registry.edge.local:5000", "127.0.0.1:10250")
        for bad in [
            "169.254.169.254", "127.0.0.1", "::1", "0.0.0.0", "fe80::1", "::ffff:169.254.169.254", "224.0.0.1",
            "100.100.100.200", "::ffff:100.100.100.200", "fd00:ec2::254",
        ] {
            #expect(!allow.allowsResolved(IPAddress(bad)!, port: 5000), "\(bad)")
        }
        #expect(allow.allowsResolved(IPAddress("10.0.3.9")!, port: 5000))
        #expect(allow.allowsResolved(IPAddress("100.100.100.201")!, port: 5000))  // CGNAT space otherwise
        #expect(allow.allowsResolved(IPAddress("fd00:ec2::253")!, port: 5000))
        #expect(allow.allowsResolved(IPAddress("127.0.0.1")!, port: 10250))  // an address rule allows it
    }
}

@Suite struct TunnelContextTests {
    /// Every dial and path probe reuses one TLS context until the credentials change; a renewal's new
    /// certificate gets a new context, so the next dial presents it.
    @Test func oneContextPerSetOfCredentials() async throws {
        let ca = try CertificateAuthority.create()
        func credentials() throws -> AgentCredentials {
            let issued = try ca.issueNodeCertificate(nodeName: "edge-1")
            return AgentCredentials(certificate: issued.certificate, privateKey: issued.privateKey, ca: ca.certificate)
        }
        let agent = try EdgeTunnelAgent(
            configuration: AgentConfiguration(nodeName: "edge-1", serverAddresses: ["127.0.0.1:1"]),
            logger: .init(label: "test"))
        #expect(throws: JoinError.self) { try agent.tunnelContext() }
        agent.useCredentials(try credentials())
        let first = try agent.tunnelContext()
        let again = try agent.tunnelContext()
        #expect(again === first)
        agent.useCredentials(try credentials())
        let renewed = try agent.tunnelContext()
        let renewedAgain = try agent.tunnelContext()
        #expect(renewed !== first && renewedAgain === renewed)
        await agent.stop()
        await agent.shutdown()
    }
}
