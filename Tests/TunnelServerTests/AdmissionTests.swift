import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import Testing
import TunnelPKI

@testable import TunnelServer
@testable import TunnelSupport

/// What decides whether a peer gets in: the unauthenticated-connection gate, per-caller streams, the join
/// rate limit and token cache, and node identities.
@Suite struct AdmissionTests {
    @Test func theGateCapsPerSourceAndInTotalAndCountsWhy() throws {
        let rejections = NIOLockedValueBox<[ConnectionGate.Rejection]>([])
        let gate = ConnectionGate(port: "secure", total: 3, perSource: 2, deadline: .seconds(10)) { _, reason in
            rejections.withLockedValue { $0.append(reason) }
        }
        #expect(gate.admit("10.0.0.1") == nil && gate.admit("10.0.0.1") == nil)
        #expect(gate.admit("10.0.0.1") == .sourceLimit)
        #expect(gate.admit("10.0.0.2") == nil)
        #expect(gate.admit("10.0.0.3") == .totalLimit)
        gate.release("10.0.0.1")
        #expect(gate.admit("10.0.0.3") == nil && gate.pendingCount == 3)
        #expect(rejections.withLockedValue { $0 } == [.sourceLimit, .totalLimit])
    }

    @Test func aConnectionThatDoesNotAuthenticateInTimeIsClosed() throws {
        let gate = ConnectionGate(port: "tunnel", total: 10, perSource: 10, deadline: .seconds(10)) { _, _ in }
        let channel = EmbeddedChannel()
        try channel.connect(to: .init(ipAddress: "10.0.0.9", port: 4242)).wait()
        try channel.pipeline.syncOperations.addHandler(gate.handler())
        #expect(gate.pendingCount == 1)
        channel.embeddedEventLoop.advanceTime(by: .seconds(9))
        #expect(channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(!channel.isActive && gate.pendingCount == 0)
    }

    /// Every connection that authenticates is counted once, on the listener's name, whether or not the gate
    /// controls overload (`edge_tunnel_server_connections_authenticated_total{port}`); one closed before that is not.
    @Test func anAuthenticatedConnectionIsCountedOnceAndAClosedOneNot() throws {
        let counted = NIOLockedValueBox<[String]>([])
        for overload in [nil, TimeAmount.seconds(2)] {
            let gate = ConnectionGate(
                port: overload == nil ? "meta" : "tunnel", total: 10, perSource: 10, deadline: .seconds(10),
                overloadTarget: overload, onAuthenticated: { port in counted.withLockedValue { $0.append(port) } },
                onReject: { _, _ in })
            let authenticated = EmbeddedChannel()
            try authenticated.connect(to: .init(ipAddress: "10.0.0.9", port: 4242)).wait()
            try authenticated.pipeline.syncOperations.addHandler(gate.handler())
            PendingConnectionHandler.authenticated(authenticated.pipeline.syncOperations)
            PendingConnectionHandler.authenticated(authenticated.pipeline.syncOperations)  // the handler is gone
            let closed = EmbeddedChannel()
            try closed.connect(to: .init(ipAddress: "10.0.0.9", port: 4243)).wait()
            try closed.pipeline.syncOperations.addHandler(gate.handler())
            _ = try closed.finish()
        }
        #expect(counted.withLockedValue { $0 } == ["meta", "tunnel"])
    }

    /// A reconnect storm larger than the cores: handshakes complete 50 a second and even the quickest takes 5 s.
    /// The gate then admits what can finish in its 2-s target (50 × 2 = 100) and closes the rest at once,
    /// instead of letting a thousand handshakes slow down together until the deadline cuts them all. Quick
    /// seconds give the limit back, doubling.
    @Test func underAHandshakeOverloadTheGateAdmitsWhatCanFinishAndShedsTheRest() throws {
        let rejections = NIOLockedValueBox<[ConnectionGate.Rejection]>([])
        let gate = ConnectionGate(
            port: "tunnel", total: 4096, perSource: 16, deadline: .seconds(10), overloadTarget: .seconds(2)
        ) { _, reason in rejections.withLockedValue { $0.append(reason) } }
        let start = NIODeadline.uptimeNanoseconds(1_000_000_000)
        func at(_ milliseconds: Int64) -> NIODeadline { start + .milliseconds(milliseconds) }
        func source(_ index: Int) -> String { "10.\(index / 65536).\(index / 256 % 256).\(index % 256)" }
        for index in 0..<1000 { #expect(gate.admit(source(index), at: at(0)) == nil) }
        for index in 0..<50 {
            gate.authenticated(after: .seconds(5), at: at(Int64(20 * index)))
            gate.release(source(index))
        }
        #expect(gate.admit(source(1000), at: at(1000)) == .overload, "950 pending of a limit of 100")
        #expect(gate.admissionLimit == 100)
        for index in 50..<901 { gate.release(source(index)) }  // cut at their deadline
        #expect(gate.pendingCount == 99)
        #expect(gate.admit(source(2000), at: at(1100)) == nil)
        #expect(gate.admit(source(2001), at: at(1100)) == .overload)
        // The queue is short again: the quickest handshake takes 100 ms. The limit doubles each such second.
        var limits: [Int] = []
        for second in 2...8 {
            gate.authenticated(after: .milliseconds(100), at: at(Int64(second) * 1000 - 500))
            _ = gate.admit(source(3000 + second), at: at(Int64(second) * 1000))
            limits.append(gate.admissionLimit)
        }
        #expect(limits == [200, 400, 800, 1600, 3200, 4096, 4096])
        #expect(rejections.withLockedValue { $0 } == [.overload, .overload])
    }

    /// Connections that never finish their handshake (no certificate, or a peer that stalls) teach the gate
    /// nothing. One slow authentication a second (a stolen certificate finishing late on purpose, or a satellite
    /// link) is no verdict either. A certificate holder that makes eight slow ones a second lowers the limit,
    /// to the floor at most; there one source may hold an eighth of it, and a second without a verdict (only
    /// stalled connections, no authentications) lets the limit grow again.
    @Test func stalledOrSlowHandshakesCannotCloseTheGateToOthers() throws {
        let gate = ConnectionGate(
            port: "tunnel", total: 4096, perSource: 256, deadline: .seconds(10), overloadTarget: .seconds(2)
        ) { _, _ in }
        let start = NIODeadline.uptimeNanoseconds(1_000_000_000)
        func at(_ milliseconds: Int64) -> NIODeadline { start + .milliseconds(milliseconds) }
        for index in 0..<3000 { #expect(gate.admit("10.1.\(index / 256).\(index % 256)", at: start) == nil) }
        for second in 1...30 { _ = gate.admit("10.2.0.\(second)", at: at(Int64(second) * 1000)) }
        #expect(gate.admissionLimit == 4096, "no authentication, no lower limit")
        for index in 0..<3000 { gate.release("10.1.\(index / 256).\(index % 256)") }  // cut at their deadline
        for second in 1...30 { gate.release("10.2.0.\(second)") }
        for second in 31...40 {
            gate.authenticated(after: .seconds(9), at: at(Int64(second) * 1000 + 500))
            _ = gate.admit("10.3.0.\(second)", at: at(Int64(second + 1) * 1000))
        }
        #expect(gate.admissionLimit == 4096, "one slow peer a second is not an overload")
        for sample in 0..<8 { gate.authenticated(after: .seconds(9), at: at(41_100 + Int64(sample))) }
        _ = gate.admit("10.4.0.1", at: at(42_000))
        #expect(gate.admissionLimit == 512 && gate.overloadFloor == 2 * gate.perSource)
        for index in 0..<64 { #expect(gate.admit("10.9.9.9", at: at(42_100)) == nil, "\(index)") }
        #expect(gate.admit("10.9.9.9", at: at(42_100)) == .sourceLimit, "one source: an eighth of 512")
        _ = gate.admit("10.4.0.2", at: at(43_200))  // a second without authentications
        #expect(gate.admissionLimit == 1024)
    }

    /// Through the handler: the time from accept to `authenticated` is what the gate learns, on the loop's
    /// clock; plain ports (no target) never lower their limit.
    @Test func theHandlerReportsHowLongAConnectionTookToAuthenticate() throws {
        let gate = ConnectionGate(
            port: "tunnel", total: 100, perSource: 2, deadline: .seconds(10), overloadTarget: .seconds(2)
        ) { _, _ in }
        let loop = EmbeddedEventLoop()
        var channels: [EmbeddedChannel] = []
        for index in 0..<80 {
            let channel = EmbeddedChannel(loop: loop)
            try channel.connect(to: .init(ipAddress: "10.0.0.\(index)", port: 4242)).wait()
            try channel.pipeline.syncOperations.addHandler(gate.handler())
            channels.append(channel)
        }
        func arrive(_ address: String) throws -> EmbeddedChannel {
            let channel = EmbeddedChannel(loop: loop)
            try channel.connect(to: .init(ipAddress: address, port: 4242)).wait()
            try channel.pipeline.syncOperations.addHandler(gate.handler())
            return channel
        }
        loop.advanceTime(by: .seconds(3))
        for channel in channels[0..<7] { PendingConnectionHandler.authenticated(channel.pipeline.syncOperations) }
        // A refused certificate's handshake (an agent's on the secure port) is not timed: seven are no verdict.
        PendingConnectionHandler.authenticated(channels[7].pipeline.syncOperations, timed: false)
        loop.advanceTime(by: .seconds(1))
        #expect(try arrive("10.0.1.1").isActive && gate.admissionLimit == 100)
        loop.advanceTime(by: .milliseconds(500))
        for channel in channels[8..<16] { PendingConnectionHandler.authenticated(channel.pipeline.syncOperations) }
        loop.advanceTime(by: .milliseconds(500))
        let late = try arrive("10.0.1.2")
        #expect(!late.isActive, "eight 4.5-s handshakes a second: the floor of 64, and 65 are pending")
        #expect(gate.admissionLimit == 64 && gate.pendingCount == 65)
        let plain = ConnectionGate(port: "meta", total: 100, perSource: 2, deadline: .seconds(10)) { _, _ in }
        #expect(plain.admit("10.0.0.1", at: .uptimeNanoseconds(0)) == nil)
        plain.authenticated(after: .seconds(9), at: .uptimeNanoseconds(0))
        #expect(plain.admit("10.0.0.2", at: .uptimeNanoseconds(5_000_000_000)) == nil && plain.admissionLimit == 100)
        for channel in channels { _ = try? channel.finish() }
    }

    @Test func oneIPv6HostRotatingThroughItsSlash64IsOneSourceAtTheGate() throws {
        let sixes = ConnectionGate(port: "tunnel", total: 10, perSource: 2, deadline: .seconds(10)) { _, _ in }
        var admitted: [EmbeddedChannel] = []
        for (index, address) in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3", "2001:db8:1:3::1"]
            .enumerated()
        {
            let peer = EmbeddedChannel()
            try peer.connect(to: .init(ipAddress: address, port: 4000 + index)).wait()
            try peer.pipeline.syncOperations.addHandler(sixes.handler())
            admitted.append(peer)
        }
        #expect(
            admitted.map(\.isActive) == [true, true, false, true],
            "the third of one /64 is turned away, another /64 is not")
        #expect(sixes.pendingCount == 3)
    }

    @Test func callerStreamsAreCountedUntilTheCallerCloses() throws {
        let streams = CallerStreams(limit: 2)
        let first = EmbeddedChannel()
        try first.connect(to: .init(ipAddress: "10.0.0.1", port: 1)).wait()
        let second = EmbeddedChannel()
        #expect(streams.admit("certificate operator", until: first))
        #expect(streams.admit("certificate operator", until: second))
        #expect(!streams.admit("certificate operator", until: EmbeddedChannel()))
        #expect(streams.admit("certificate other", until: EmbeddedChannel()))
        try first.close().wait()
        first.embeddedEventLoop.run()
        #expect(streams.admit("certificate operator", until: EmbeddedChannel()))
    }

    @Test func joinsAreRateLimitedPerSource() {
        let guardian = JoinGuard(
            store: TokenStore(path: "/nonexistent/tokens.json"), perSource: 3, window: .seconds(10))
        let start = NIODeadline.now()
        for _ in 0..<3 { #expect(guardian.admit("10.0.0.1", now: start)) }
        #expect(!guardian.admit("10.0.0.1", now: start + .seconds(1)))
        #expect(guardian.admit("10.0.0.2", now: start + .seconds(1)))
        #expect(guardian.admit("10.0.0.1", now: start + .seconds(11)))
    }

    @Test func tokensAreReadAgainOnlyWhenTheFileChanges() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("joinguard-\(UUID())").path
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let store = TokenStore(paths: PKIPaths(directory: folder))
        let (first, _) = try store.create(ttl: 0)
        let guardian = JoinGuard(store: store)
        #expect(try guardian.verify(first.description).id == first.id)
        let (second, _) = try store.create(ttl: 0)  // a new file: read again
        #expect(try guardian.verify(second.description).id == second.id)
        try store.delete(id: first.id)
        #expect(throws: PKIError.self) { try guardian.verify(first.description) }

        // Unchanged on disk as far as a stat can tell (same inode, size and time), but unreadable: a guard that
        // read the file on every attempt would now fail; this one answers from memory.
        var before = stat()
        #expect(stat(store.path, &before) == 0)
        let size = Int(before.st_size)
        let handle = try #require(FileHandle(forWritingAtPath: store.path))
        try handle.write(contentsOf: Data(repeating: UInt8(ascii: "x"), count: size))
        try handle.close()
        var times = [before.st_atim, before.st_mtim]
        #expect(utimensat(AT_FDCWD, store.path, &times, 0) == 0)
        #expect(throws: (any Error).self) { try store.list() }
        #expect(try guardian.verify(second.description).id == second.id)
    }

    @Test func aResetVoidsEarlierCertificatesAndARevocationAllOfThem() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("nodes-\(UUID())").path
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let paths = PKIPaths(directory: folder)
        let identities = try NodeIdentities(paths: paths)
        let issued = Date().addingTimeInterval(-CertificateAuthority.backdate - 5)  // 5 s ago, back-dated
        try identities.recordJoin("edge-1", ips: [IPAddress("10.0.3.7")!], certificateValidFrom: issued)
        #expect(identities.accepts(node: "edge-1", certificateValidFrom: issued))
        // Taken.
        #expect(throws: PKIError.self) { try identities.recordJoin("edge-1", ips: [], certificateValidFrom: issued) }
        // Another name cannot take edge-1's IP.
        #expect(throws: PKIError.self) {
            try identities.recordJoin("edge-evil", ips: [IPAddress("10.0.3.7")!], certificateValidFrom: issued)
        }

        try NodeStore(paths: paths).reset("edge-1")
        try identities.reloadIfChanged()
        #expect(!identities.accepts(node: "edge-1", certificateValidFrom: issued))
        let reissued = identities.issuingTime(for: "edge-1").addingTimeInterval(-CertificateAuthority.backdate)
        #expect(identities.accepts(node: "edge-1", certificateValidFrom: reissued))
        #expect(throws: PKIError.self) {  // a certificate signed before the reset cannot be recorded after it
            try identities.recordJoin("edge-1", ips: [], certificateValidFrom: issued)
        }
        try identities.recordJoin("edge-1", ips: [], certificateValidFrom: reissued)  // may join again

        try NodeStore(paths: paths).revoke("edge-1")
        try identities.reloadIfChanged()
        #expect(!identities.accepts(node: "edge-1", certificateValidFrom: reissued))
        #expect(throws: PKIError.self) { try identities.recordJoin("edge-1", ips: [], certificateValidFrom: reissued) }
        #expect(identities.accepts(node: "edge-2", certificateValidFrom: issued))  // unknown names: as before
    }
}

@Suite struct JoinGuardBoundTests {
    @Test func ipv6SourcesCountByTheirSlash64AndTheTableIsBounded() {
        let guardian = JoinGuard(
            store: TokenStore(path: "/nonexistent/tokens.json"), perSource: 2, window: .seconds(10))
        let now = NIODeadline.now()
        #expect(guardian.admit("fd00::1", now: now) && guardian.admit("fd00::2", now: now))
        #expect(!guardian.admit("fd00::ffff", now: now))  // same /64
        for index in 0..<JoinGuard.maxSources {
            _ = guardian.admit("10.\(index >> 16).\((index >> 8) & 255).\(index & 255)", now: now)
        }
        #expect(!guardian.admit("192.168.7.7", now: now + .seconds(1)))  // full, nothing expired yet
        #expect(guardian.admit("192.168.7.7", now: now + .seconds(11)))  // expired sources forgotten
    }
}

@Suite struct RenewalGuardTests {
    @Test func aNodeGetsOneRenewalPerIntervalWhicheverConnectionAsksAndASourceAFew() {
        let renewals = RenewalGuard()
        let now = NIODeadline.now()
        #expect(renewals.admit(node: "edge-1", source: "10.0.0.1", now: now) == nil)
        // The same node on a new connection, from anywhere: refused until the interval has passed.
        #expect(renewals.admit(node: "edge-1", source: "10.0.0.2", now: now + .seconds(1))?.contains("edge-1") == true)
        #expect(renewals.admit(node: "edge-1", source: "10.0.0.1", now: now + .seconds(11)) == nil)
        // Many nodes behind one address: at most RenewalGuard.perSource in one interval.
        let later = now + .seconds(30)
        for index in 0..<RenewalGuard.perSource {
            #expect(renewals.admit(node: "stolen-\(index)", source: "192.0.2.9", now: later) == nil)
        }
        #expect(renewals.admit(node: "stolen-x", source: "192.0.2.9", now: later)?.contains("192.0.2.9") == true)
        #expect(renewals.admit(node: "other", source: "192.0.2.10", now: later) == nil)
        #expect(renewals.admit(node: "stolen-y", source: "192.0.2.9", now: later + .seconds(10)) == nil)
        // A dual-stack listener sees IPv4 callers as ::ffff:a.b.c.d: each keeps its own key, not one /64 for all.
        #expect(SourceKey.of("::ffff:192.0.2.9") == "192.0.2.9")
        #expect(SourceKey.of("::ffff:192.0.2.10") != SourceKey.of("::ffff:192.0.2.9"))
        #expect(SourceKey.of("fd00::1") == SourceKey.of("fd00::2"))
    }

    /// Issue 14's leftover: the node's slot was charged before signing, so a renewal that failed (a bad CSR) made
    /// the node's next, valid renewal wait the whole interval.
    @Test func aRenewalThatSignedNothingGivesTheNodesSlotBackButNotTheSources() {
        let renewals = RenewalGuard()
        let now = NIODeadline.now()
        #expect(renewals.admit(node: "edge-1", source: "10.0.0.1", now: now) == nil)
        renewals.signedNothing(node: "edge-1", admittedAt: now)
        #expect(renewals.admit(node: "edge-1", source: "10.0.0.1", now: now + .seconds(1)) == nil)
        // Signed this time: the slot stays taken.
        #expect(renewals.admit(node: "edge-1", source: "10.0.0.1", now: now + .seconds(2)) != nil)
        // A refund from a window that has passed gives nothing back in the next one.
        let next = now + AgentSession.renewalInterval + .seconds(1)
        #expect(renewals.admit(node: "edge-2", source: "10.0.0.3", now: now) == nil)
        #expect(renewals.admit(node: "edge-2", source: "10.0.0.3", now: next) == nil)
        renewals.signedNothing(node: "edge-2", admittedAt: now)
        #expect(renewals.admit(node: "edge-2", source: "10.0.0.3", now: next + .seconds(1)) != nil)
        // Failing renewals still count against their source.
        let later = now + .seconds(600)
        for index in 0..<RenewalGuard.perSource {
            #expect(renewals.admit(node: "n-\(index)", source: "192.0.2.7", now: later) == nil)
            renewals.signedNothing(node: "n-\(index)", admittedAt: later)
        }
        #expect(renewals.admit(node: "n-x", source: "192.0.2.7", now: later)?.contains("192.0.2.7") == true)
    }
}
