import Testing

@testable import TunnelSupport

@Suite struct PoolNameTests {
    @Test func aDeclaredPoolIsADNSLabel() {
        for good in ["a", "line-pool", "np0a1b2c3d", String(repeating: "a", count: 63)] {
            #expect(PoolName.isValid(good), "\(good)")
        }
        for bad in ["", "A", "-a", "a-", "a_b", "a.b", "a b", String(repeating: "a", count: 64), "ä"] {
            #expect(!PoolName.isValid(bad), "\(bad)")
        }
        #expect(throws: ConfigurationError.self) { try PoolName.validate("Bad", what: "--pool") }
    }

    @Test func nodeLabelValuesAndKeys() {
        #expect(PoolName.isLabelValue("Pool_1.a"))
        #expect(!PoolName.isLabelValue("_a") && !PoolName.isLabelValue("") && !PoolName.isLabelValue("a/b"))
        #expect(
            PoolName.isLabelKey(PoolName.openYurtLabel) && PoolName.isLabelKey(PoolName.ackLabel)
                && PoolName.isLabelKey("pool"))
        #expect(!PoolName.isLabelKey("a/b/c") && !PoolName.isLabelKey("Bad_Prefix/pool") && !PoolName.isLabelKey("x/"))
    }

    @Test func anUnknownPathIsShownAsUnknown() {
        #expect(TunnelPath.shown("private") == "private" && TunnelPath.shown("internet") == "internet")
        #expect(TunnelPath.shown(nil) == "unknown" && TunnelPath.shown("satellite") == "unknown")
    }
}
