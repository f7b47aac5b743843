import NIOCore
import Testing

@testable import TunnelWire

/// The ledger alone, without channels: every way a stream takes from the budgets and every way it leaves (ends,
/// lingers, moves to another connection, dies with its connection) gives back exactly what it took, once.
@Suite struct BudgetLedgerTests {
    static func limits(process: Int = 64 << 20, retained: Int = 8 << 20, maxRetained: Int = 1 << 20) -> TunnelLimits {
        var limits = TunnelLimits()
        limits.initialWindow = 64 * 1024
        limits.maximumWindow = 1 << 20
        limits.maxRetained = maxRetained
        limits.processBudget = WindowBudget(limit: process)
        limits.processRetained = RetainedBudget(limit: retained)
        return limits
    }

    static func open(_ ledger: inout BudgetLedger, id: UInt32) throws -> TunnelMux.Stream {
        let opened = ledger.openWindow()
        let window = try #require(opened)
        return TunnelMux.Stream(id: id, openedBy: .local, sendWindow: 0, receive: window)
    }

    /// The peer fills the window and the socket drains it promptly: the window doubles once.
    static func grow(_ ledger: inout BudgetLedger, _ stream: TunnelMux.Stream) throws -> Int {
        let size = stream.receive.size
        try stream.receive.receive(size)
        return ledger.consumed(size, by: stream, promptly: true)?.growth ?? 0
    }

    static func bytes(_ count: Int) -> ByteBuffer { ByteBuffer(repeating: 7, count: count) }

    @Test func anOpenGrownRetainingStreamGivesEverythingBackOnce() throws {
        let limits = Self.limits()
        var ledger = BudgetLedger(limits: limits)
        let stream = try Self.open(&ledger, id: 1)
        #expect(ledger.windows == 64 * 1024 && limits.processBudget!.inUse == 64 * 1024)
        let growth = try Self.grow(&ledger, stream)
        #expect(growth == 64 * 1024)
        #expect(stream.charge.window == stream.receive.size && stream.receive.size == 128 * 1024)
        #expect(ledger.windows == 128 * 1024 && limits.processBudget!.inUse == 128 * 1024)

        let kept = ledger.retain(Self.bytes(3000), for: stream) && ledger.retain(Self.bytes(5000), for: stream)
        #expect(kept)
        #expect(ledger.retained == 8000 && limits.processRetained!.inUse == 8000)
        ledger.releaseRetained(stream, upTo: 3500)  // the peer credited 3,500 bytes
        #expect(stream.retainedBytes == 4500 && ledger.retained == 4500 && limits.processRetained!.inUse == 4500)

        ledger.release(stream)
        ledger.release(stream)  // a second release gives back nothing
        #expect(ledger.windows == 0 && ledger.retained == 0)
        #expect(limits.processBudget!.inUse == 0 && limits.processRetained!.inUse == 0)
        #expect(stream.sent == 8000, "what was sent still counts after the kept bytes are let go")
    }

    @Test func aLingeringStreamGivesItsWindowBackFirstAndItsKeptBytesLater() throws {
        let limits = Self.limits()
        var ledger = BudgetLedger(limits: limits)
        let stream = try Self.open(&ledger, id: 1)
        let kept = ledger.retain(Self.bytes(1000), for: stream)
        #expect(kept)
        ledger.releaseWindow(stream)  // ended: it lingers with what it kept
        #expect(ledger.windows == 0 && limits.processBudget!.inUse == 0)
        #expect(ledger.retained == 1000 && limits.processRetained!.inUse == 1000)
        ledger.releaseRetained(stream)  // confirmed by the peer's PONG
        #expect(ledger.retained == 0 && limits.processRetained!.inUse == 0)
    }

    @Test func retentionPastTheTunnelsBoundIsRefusedWithNothingTaken() throws {
        let limits = Self.limits(maxRetained: 10_000)
        var ledger = BudgetLedger(limits: limits)
        let stream = try Self.open(&ledger, id: 1)
        let first = ledger.retain(Self.bytes(9000), for: stream)
        #expect(first && !ledger.retainFits(2000))
        let second = ledger.retain(Self.bytes(2000), for: stream)
        #expect(!second)
        #expect(stream.retainedBytes == 9000 && ledger.retained == 9000 && limits.processRetained!.inUse == 9000)
        ledger.release(stream)
        #expect(limits.processRetained!.inUse == 0)
    }

    @Test func theProcessBoundRefusesRetentionThatTheTunnelWouldAllow() throws {
        let limits = Self.limits(retained: 4000)
        var ledger = BudgetLedger(limits: limits)
        let stream = try Self.open(&ledger, id: 1)
        let kept = ledger.retain(Self.bytes(5000), for: stream)
        #expect(!kept)
        #expect(stream.retainedBytes == 0 && ledger.retained == 0 && limits.processRetained!.inUse == 0)
    }

    @Test func aStreamMovedToAnotherConnectionIsCountedThereAndGivenBackOnce() throws {
        let limits = Self.limits()
        var old = BudgetLedger(limits: limits)
        var new = BudgetLedger(limits: limits)
        let moved = try Self.open(&old, id: 1)
        let dropped = try Self.open(&old, id: 3)
        let kept = old.retain(Self.bytes(2000), for: moved) && old.retain(Self.bytes(700), for: dropped)
        #expect(kept)
        let inUse = limits.processBudget!.inUse

        old.handOut([moved, dropped])
        #expect(old.windows == 0 && old.retained == 0)
        #expect(limits.processBudget!.inUse == inUse && limits.processRetained!.inUse == 2700, "still held")

        new.takeIn(moved)
        #expect(new.windows == moved.receive.size && new.retained == 2000)
        new.release(dropped)  // not taken in (past the resume limit): only the process counted it
        #expect(new.windows == moved.receive.size && new.retained == 2000)
        #expect(limits.processBudget!.inUse == moved.receive.size && limits.processRetained!.inUse == 2000)

        let growth = try Self.grow(&new, moved)
        #expect(growth > 0, "a taken-in stream grows on its new connection's budget")
        new.release(moved)
        #expect(new.windows == 0 && new.retained == 0)
        #expect(limits.processBudget!.inUse == 0 && limits.processRetained!.inUse == 0)
    }

    @Test func aStreamThatDoesNotFitTheProcessBudgetTakesNothing() throws {
        var limits = Self.limits(process: 48 * 1024)
        limits.initialWindow = 32 * 1024
        var ledger = BudgetLedger(limits: limits)
        let first = try Self.open(&ledger, id: 1)
        let second = try Self.open(&ledger, id: 3)  // the minimum still fits
        #expect(second.receive.size == limits.minimumWindow)
        let third = ledger.openWindow()
        #expect(third == nil)
        #expect(ledger.windows == first.receive.size + second.receive.size)
        #expect(limits.processBudget!.inUse == ledger.windows)
    }

    /// Thousands of seeded random steps over three connections: at every step the sums equal what the streams
    /// they count hold, and the process budgets equal what all streams hold; at the end everything is back.
    @Test func randomLivesKeepEverySumEqualToWhatTheStreamsHold() throws {
        let limits = Self.limits(process: 8 << 20, retained: 2 << 20, maxRetained: 1 << 20)
        var ledgers = [BudgetLedger](repeating: BudgetLedger(limits: limits), count: 3)
        var owned: [[TunnelMux.Stream]] = [[], [], []]
        var inTransit: [TunnelMux.Stream] = []
        var rng = SplitMix(seed: 0x5EED)
        var nextID: UInt32 = 1
        for _ in 0..<5000 {
            let c = Int.random(in: 0..<3, using: &rng)
            switch Int.random(in: 0..<8, using: &rng) {
            case 0, 1:
                if ledgers[c].windows < 4 << 20, let window = ledgers[c].openWindow() {
                    owned[c].append(TunnelMux.Stream(id: nextID, openedBy: .local, sendWindow: 0, receive: window))
                    nextID += 2
                }
            case 2:
                if let stream = owned[c].randomElement(using: &rng) { _ = try Self.grow(&ledgers[c], stream) }
            case 3:
                if let stream = owned[c].randomElement(using: &rng) {
                    _ = ledgers[c].retain(Self.bytes(Int.random(in: 1...40_000, using: &rng)), for: stream)
                }
            case 4:
                if let stream = owned[c].randomElement(using: &rng) {
                    let upTo = UInt64.random(in: stream.retainedFrom...stream.sent, using: &rng)
                    ledgers[c].releaseRetained(stream, upTo: upTo)
                }
            case 5:
                if let index = owned[c].indices.randomElement(using: &rng) {
                    ledgers[c].release(owned[c].remove(at: index))
                }
            case 6:  // the connection is suspended and handed over: its streams wait for a successor
                ledgers[c].handOut(owned[c])
                inTransit += owned[c]
                owned[c] = []
            default:  // a successor takes some in and ends the rest
                for stream in inTransit {
                    if Bool.random(using: &rng) {
                        ledgers[c].takeIn(stream)
                        owned[c].append(stream)
                    } else {
                        ledgers[c].release(stream)
                    }
                }
                inTransit = []
            }
            for i in 0..<3 {
                #expect(ledgers[i].windows == owned[i].reduce(0) { $0 + $1.receive.size })
                #expect(ledgers[i].retained == owned[i].reduce(0) { $0 + $1.retainedBytes })
                #expect(ledgers[i].retained <= limits.maxRetained)
            }
            let all = owned.joined() + inTransit
            #expect(limits.processBudget!.inUse == all.reduce(0) { $0 + $1.charge.window })
            #expect(limits.processRetained!.inUse == all.reduce(0) { $0 + $1.retainedBytes })
            #expect(all.allSatisfy { $0.charge.window == $0.receive.size })
        }
        for i in 0..<3 {
            for stream in owned[i] { ledgers[i].release(stream) }
        }
        for stream in inTransit { ledgers[0].release(stream) }
        #expect(ledgers.allSatisfy { $0.windows == 0 && $0.retained == 0 })
        #expect(limits.processBudget!.inUse == 0 && limits.processRetained!.inUse == 0)
    }
}

/// ReplicaProbePacerTests' seeded generator, as a `RandomNumberGenerator`: a failing sequence is the same on every run.
extension SplitMix: RandomNumberGenerator {}
