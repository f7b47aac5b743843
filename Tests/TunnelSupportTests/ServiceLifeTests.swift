import NIOConcurrencyHelpers
import Testing
import TunnelSupport

/// The life shared by the server's and the agent's services: start runs once whoever calls it, a failed start
/// ends the service, and drain moves it through draining to stopped.
@Suite struct ServiceLifeTests {
    struct Refused: Error {}

    @Test func startRunsOnceEvenWhenCalledTwiceAtOnce() async throws {
        let life = ServiceLife()
        let runs = NIOLockedValueBox(0)
        #expect(life.state == .created)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<2 {
                group.addTask {
                    try await life.start {
                        runs.withLockedValue { $0 += 1 }
                        try await Task.sleep(for: .milliseconds(50))
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(runs.withLockedValue { $0 } == 1)
        #expect(life.state == .running)
    }

    @Test func aFailedStartStopsTheServiceAndIsNotRetried() async throws {
        let life = ServiceLife()
        await #expect(throws: Refused.self) { try await life.start { throw Refused() } }
        #expect(life.state == .stopped)
        try await life.start { Issue.record("a stopped service started again") }
    }

    @Test func drainGoesThroughDrainingToStopped() async throws {
        let life = ServiceLife()
        try await life.start {}
        let seen = NIOLockedValueBox<ServiceState?>(nil)
        await life.drain { seen.withLockedValue { $0 = life.state } }
        #expect(seen.withLockedValue { $0 } == .draining)
        #expect(life.state == .stopped)
    }
}
