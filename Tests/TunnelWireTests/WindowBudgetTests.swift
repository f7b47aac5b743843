import Testing

@testable import TunnelWire

/// The process's window budget: a bound on what all peers together can make us hold, that degrades to small
/// windows before it refuses a stream.
@Suite struct WindowBudgetTests {
    @Test func manyStreamsGetMinimumWindowsBeforeAnyIsRefused() {
        let budget = WindowBudget(limit: 512 << 20)
        var windows: [Int] = []
        while let window = budget.takeWindow(1 << 20, minimum: 16 << 10) { windows.append(window) }
        // A quarter of the limit for windows above the minimum: 128 MiB of 1 MiB windows less their minimums,
        // then minimum windows until the whole limit is used.
        #expect(windows.count >= (384 << 20) / (16 << 10))
        #expect(windows.count == (384 << 20) / (16 << 10))
        #expect(windows.reduce(0) { $0 + $1 - (16 << 10) } == 128 << 20)
        #expect(windows.prefix(10).allSatisfy { $0 == 1 << 20 })
        #expect(windows.suffix(10).allSatisfy { $0 == 16 << 10 })
        #expect(budget.inUse == 512 << 20)
        #expect(!budget.takeGrowth(16 << 10))
        for window in windows { budget.release(window: window, minimum: 16 << 10) }
        #expect(budget.inUse == 0)
        #expect(budget.takeWindow(1 << 20, minimum: 16 << 10) == 1 << 20)
    }

    @Test func growthComesOnlyFromTheExtraShare() {
        let budget = WindowBudget(limit: 64 << 20)
        let first = budget.takeWindow(1 << 20, minimum: 16 << 10)!
        var grown = 0
        while budget.takeGrowth(1 << 20) { grown += 1 << 20 }
        #expect(first + grown - (16 << 10) <= 16 << 20)  // the extra share: a quarter of 64 MiB
        #expect(budget.takeWindow(1 << 20, minimum: 16 << 10)! < 64 << 10)  // the share is used: about the minimum
        budget.giveGrowth(1 << 20)
        #expect(budget.takeWindow(1 << 20, minimum: 16 << 10) == 1 << 20)
    }
}
