import NIOCore

/// Runs Swift tasks on a NIO event loop (`withTaskExecutorPreference`), so that async code which mostly waits on
/// channels of that loop — the gRPC frontend's RPC handlers, `edgetunnel forward --server grpc:` — resumes on the
/// thread its I/O happens on instead of waking a thread of the global executor for every message. On a machine
/// with a core or two that wake-up costs more than the work it carries.
public final class EventLoopTaskExecutor: TaskExecutor, @unchecked Sendable {
    public let eventLoop: EventLoop

    public init(_ eventLoop: EventLoop) {
        self.eventLoop = eventLoop
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        eventLoop.execute {
            job.runSynchronously(on: self.asUnownedTaskExecutor())
        }
    }
}
