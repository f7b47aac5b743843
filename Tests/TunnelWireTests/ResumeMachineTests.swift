import NIOCore
import NIOEmbedded
import Testing

@testable import TunnelWire

/// The resume phases of a tunnel (``ResumeMachine``): each transition, what it hands back to undo (the timer of the
/// phase it leaves), and the transitions that must not happen from the wrong phase. The mux's behaviour on top of
/// them is in ResumeTests and CrossLoopResumeTests.
@Suite struct ResumeMachineTests {
    let loop = EmbeddedEventLoop()

    func timer() -> Scheduled<Void> { loop.scheduleTask(in: .hours(1)) {} }

    /// The same scheduled task (a `Scheduled` is a value; its future is the task's identity).
    func same(_ a: Scheduled<Void>?, _ b: Scheduled<Void>?) -> Bool { a?.futureResult === b?.futureResult }

    @Test func suspendKeepsResetsAndHandsThemOverWithItsTimer() throws {
        var machine = ResumeMachine()
        let kept = machine.noteReset(7)
        #expect(!kept, "a live tunnel sends its RST at once")
        let noTimer = machine.suspend()
        #expect(noTimer == nil)
        let grace = timer()
        machine.setTimer(grace)
        let seven = machine.noteReset(7)
        let nine = machine.noteReset(9)
        #expect(seven && nine)
        let successor = TunnelMux(role: .server, eventLoop: loop)
        let handed = machine.handOver(to: successor)
        let taken = try #require(handed)
        #expect(taken.resets == [7, 9])
        #expect(same(taken.timer, grace))
        #expect(machine.successor === successor)
        let again = machine.handOver(to: successor)
        #expect(again == nil, "handed over once")
        let ended = machine.end()
        #expect(ended == nil, "a handed-over tunnel keeps its successor when its connection ends")
        #expect(machine.successor === successor)
    }

    @Test func theServerTakesOverFreezesAndThaws() {
        var machine = ResumeMachine()
        machine.beginTakeOver()
        #expect(machine.isTakingOver)
        let left = machine.adopt(frozen: [3, 5], answerDue: true)
        #expect(left == nil)
        #expect(!machine.isTakingOver && machine.answerDue && machine.hasFrozen)
        #expect(machine.isFrozen(3) && machine.isFrozen(5) && !machine.isFrozen(4))
        let giveUp = timer()
        machine.setTimer(giveUp)
        let (ids, cancelled) = machine.thaw()
        #expect(ids == [3, 5] && same(cancelled, giveUp))
        #expect(!machine.answerDue && !machine.isFrozen(3))
        let again = machine.thaw()
        #expect(again.ids.isEmpty, "thawed once")
    }

    /// An answer can be due with nothing frozen (the old tunnel's grace ended: an empty RESUME went out).
    @Test func anAnswerDueWithNothingFrozen() {
        var machine = ResumeMachine()
        machine.beginTakeOver()
        _ = machine.adopt(frozen: [], answerDue: true)
        #expect(machine.answerDue && !machine.hasFrozen)
        _ = machine.thaw()
        #expect(!machine.answerDue)
        // Nothing frozen and nothing due: live at once.
        _ = machine.adopt(frozen: [], answerDue: false)
        #expect(!machine.answerDue && !machine.isTakingOver && machine.successor == nil)
    }

    @Test func theAgentTakesItsExpectedTunnelOnce() {
        var machine = ResumeMachine()
        let unexpected = machine.takeExpected()
        #expect(unexpected == nil, "a RESUME nobody expected")
        let old = TunnelMux(role: .agent, eventLoop: loop)
        machine.expect(from: old)
        let first = machine.takeExpected()
        #expect(first! === old)
        let second = machine.takeExpected()
        #expect(second == nil)
        machine.expect(from: nil)
        let none = machine.takeExpected()
        #expect(none != nil && none! == nil, "expected, but nothing waits any more: answered with an empty RESUME")
    }

    /// Leaving a phase that has a timer hands the timer back; a suspension ends any takeover in flight.
    @Test func suspendingOrEndingHandsBackTheTimerOfThePhaseLeft() {
        var machine = ResumeMachine()
        machine.beginTakeOver()
        _ = machine.adopt(frozen: [1], answerDue: true)
        let giveUp = timer()
        machine.setTimer(giveUp)
        let suspendedFrom = machine.suspend()
        #expect(same(suspendedFrom, giveUp))
        #expect(!machine.isFrozen(1) && !machine.answerDue)
        let grace = timer()
        machine.setTimer(grace)
        let endedFrom = machine.end()
        #expect(same(endedFrom, grace))
        let reset = machine.noteReset(1)
        #expect(!reset, "ended: nothing waits for a resuming connection")
        machine.beginTakeOver()
        let none = machine.suspend()
        #expect(none == nil)
        #expect(!machine.isTakingOver)
    }

    /// A takeover begins only on a live tunnel: not on one suspended or handed over.
    @Test func aTakeoverBeginsOnlyWhenLive() {
        var machine = ResumeMachine()
        _ = machine.suspend()
        machine.beginTakeOver()
        let kept = machine.noteReset(2)
        #expect(!machine.isTakingOver && kept)
    }
}
