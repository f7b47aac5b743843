import NIOCore

extension EventLoopFuture where Value == Void {
    /// Waits for this future, or for `timeout` if that passes first (a drain that must end).
    public func orTimeout(_ timeout: TimeAmount) async {
        let done = eventLoop.makePromise(of: Void.self)
        let timer = eventLoop.scheduleTask(in: timeout) { done.succeed(()) }
        whenComplete { _ in
            timer.cancel()
            done.succeed(())
        }
        try? await done.futureResult.get()
    }
}
