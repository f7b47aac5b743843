import Testing

@testable import KubeAPI

/// A Service's addresses become SANs of the serving certificate: only IP addresses and DNS names a certificate may
/// carry are taken (names in lower case, as DNS compares them), wildcards never; what is left out is named.
@Suite struct ServiceAddressesTests {
    @Test func wildcardsAndWhatIsNeitherAnIPNorADNSNameAreLeftOutAndNamed() {
        let checked = ServiceAddresses.check(
            ips: ["10.96.0.10", "fd00:0::1", "*", "10.0.0.0/8", "[fd00::2]", "fe80::1%eth0", "10.96.0.10", ""],
            dnsNames: ["lb.example.com", "*.example.com", "*", "LB.Example.com", "a..b", "10.0.0.9", "-lb.example.com"])
        #expect(checked.ips == ["10.96.0.10", "fd00::1"])
        #expect(checked.dnsNames == ["lb.example.com"])
        #expect(
            checked.invalid == [
                "*", "10.0.0.0/8", "[fd00::2]", "fe80::1%eth0", "", "*.example.com", "*", "a..b", "10.0.0.9",
                "-lb.example.com",
            ])
        #expect(checked.count == 3)
    }

    @Test func theAddressesOfAServiceObjectAreReadFromItsSpecAndStatus() {
        let service: [String: any Sendable] = [
            "spec": [
                "clusterIPs": ["10.96.0.10"], "externalIPs": ["192.0.2.7", "*"],
            ] as [String: any Sendable],
            "status": [
                "loadBalancer": [
                    "ingress": [["ip": "198.51.100.4"], ["hostname": "*.elb.example.com"]] as [[String: any Sendable]]
                ] as [String: any Sendable]
            ] as [String: any Sendable],
        ]
        let found = ServiceAddresses.addresses(of: service)
        let checked = ServiceAddresses.check(ips: found.ips, dnsNames: found.dnsNames)
        #expect(checked.ips == ["10.96.0.10", "192.0.2.7", "198.51.100.4"])
        #expect(checked.dnsNames.isEmpty)
        #expect(checked.invalid == ["*", "*.elb.example.com"])
    }
}
