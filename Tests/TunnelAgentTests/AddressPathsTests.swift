import Testing
import TunnelSupport

@testable import TunnelAgent

/// The path an agent reports for the address its tunnel is on (docs/PROTOCOL.md, "Paths").
@Suite struct AddressPathsTests {
    @Test func marksAreTakenOffTheAddressesAndKept() throws {
        let (addresses, marks) = try AddressPaths.parse([
            "private=10.0.0.5:10262", "203.0.113.7:10262", "internet=[2001:db8::1]:10262",
        ])
        #expect(addresses == ["10.0.0.5:10262", "203.0.113.7:10262", "[2001:db8::1]:10262"])
        #expect(marks == ["10.0.0.5:10262": .private, "[2001:db8::1]:10262": .internet])
    }

    @Test func anUnknownOrContradictoryMarkIsAnError() {
        #expect(throws: ConfigurationError.self) { try AddressPaths.parse(["line=10.0.0.5:10262"]) }
        #expect(throws: ConfigurationError.self) {
            try AddressPaths.parse(["private=10.0.0.5:10262", "internet=10.0.0.5:10262"])
        }
    }

    @Test func aMarkWins() {
        let list = ["a.example.com:10262", "10.0.0.5:10262"]
        let marks: [String: TunnelPath] = ["a.example.com:10262": .internet, "10.0.0.5:10262": .private]
        #expect(AddressPaths.path(of: "a.example.com:10262", in: list, marks: marks) == .internet)
        #expect(AddressPaths.path(of: "10.0.0.5:10262", in: list, marks: marks) == .private)
    }

    @Test func inAListOfSeveralTheFirstIsTheLine() {
        // An express-connect pool's list: the line, then the public address — whatever the addresses look like.
        let list = ["127.0.0.1:10262", "127.0.0.2:10262", "tunnel.example.com:10262"]
        #expect(AddressPaths.path(of: "127.0.0.1:10262", in: list, marks: [:]) == .private)
        #expect(AddressPaths.path(of: "127.0.0.2:10262", in: list, marks: [:]) == .internet)
        #expect(AddressPaths.path(of: "tunnel.example.com:10262", in: list, marks: [:]) == .internet)
    }

    @Test func aLoneAddressIsJudgedByWhatItIs() {
        for address in [
            "10.1.2.3:10262", "172.20.0.1:10262", "192.168.1.1:10262", "100.100.1.1:10262", "127.0.0.1:10262",
            "[::1]:10262", "[fd00::1]:10262", "x-tunnel-server-line.kube-system.svc:10262",
            "x-tunnel-server-svc.kube-system.svc.cluster.local:10262", "tunnel:10262",
        ] {
            #expect(AddressPaths.path(of: address, in: [address], marks: [:]) == .private, "\(address)")
        }
        for address in ["203.0.113.7:10262", "8.8.8.8:10262", "[2001:db8::1]:10262", "tunnel.example.com:10262"] {
            #expect(AddressPaths.path(of: address, in: [address], marks: [:]) == .internet, "\(address)")
        }
    }
}
