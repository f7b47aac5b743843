import Testing

@testable import TunnelSupport

/// The one parser of `host:port` (flags, allow rules, CONNECT targets, Host headers, probe addresses).
@Suite struct HostPortTests {
    @Test func splitTakesBracketsOffAndCutsAtTheLastColon() throws {
        let v4 = try #require(HostPort.split("10.0.0.1:10250"))
        #expect(v4.host == "10.0.0.1" && v4.port == "10250")
        let v6 = try #require(HostPort.split("[fd00::1]:10262"))
        #expect(v6.host == "fd00::1" && v6.port == "10262")
        // Unchecked: what the parts mean is the caller's (a range in an allow rule, a CIDR host).
        let rule = try #require(HostPort.split("10.0.0.0/8:10250-10255"))
        #expect(rule.host == "10.0.0.0/8" && rule.port == "10250-10255")
        #expect(HostPort.split("edge-7") == nil)
        #expect(HostPort.split("[fd00::1]10262") == nil)
        #expect(HostPort.split("[fd00::1:10262") == nil)
    }

    @Test func anAuthorityIsANameOrAddressAndAPortInRange() {
        #expect(HostPort(authority: "Edge-7:10250") == HostPort(host: "edge-7", port: 10250))
        #expect(HostPort(authority: "[FD00::1]:443")?.description == "[fd00::1]:443")
        for bad in [
            "edge-7", "edge-7:0", "edge-7:65536", "edge-7:+80", ":80", "fd00::1:443", "[fd00::1]",
            "a b:80", "edge_7:80", String(repeating: "a", count: 254) + ":80", "edge-7:80:80x",
        ] {
            #expect(HostPort(authority: bad) == nil, "\(bad)")
        }
    }
}
