import NIOConcurrencyHelpers
import NIOCore

/// The packets one Proxy RPC sends its client, in order, for the task that writes them (``next()``).
///
/// Two kinds of packet, two bounds:
/// - DATA from the tunnel is never refused here: each connectID's bytes are bounded by its stream's window, which
///   is credited back only once the write of that packet returned (``ProxyConnection/written(_:)``). A client that
///   stops reading therefore holds one window per connectID, as a socket caller does.
/// - Answers to the client's own packets (DIAL_RSP, CLOSE_RSP) are bounded by ``answerLimit``: the task reading the
///   client's packets waits for room (``waitForRoom()``) before it reads the next one. A client that sends a
///   million CLOSE_REQs and reads nothing stops being read, instead of growing this queue.
///
/// Thread-safe; every wait gives up when the RPC's task is cancelled.
final class ProxyOutbox: @unchecked Sendable {
    enum Item {
        case answer(Packet)
        /// DATA towards the client: `count` bytes to credit back to `connection` once written.
        case data(Packet, connection: ProxyConnection, count: Int)
    }

    /// Answers queued before the reader waits.
    static let answerLimit = 64

    private let lock = NIOLock()
    private var items = CircularBuffer<Item>()
    /// Answers in `items`.
    private var answers = 0
    private var finished = false
    /// The writing task, waiting for an item (only while `items` is empty).
    private var writer: CheckedContinuation<Item?, Never>?
    /// The reading task, waiting for room (only while `answers` is at the limit).
    private var reader: CheckedContinuation<Void, Never>?

    /// Nothing waits to be written.
    var isEmpty: Bool { lock.withLock { items.isEmpty } }

    /// Queues `item`; dropped once the RPC ended.
    func push(_ item: Item) {
        let waiting: CheckedContinuation<Item?, Never>? = lock.withLock {
            guard !finished else { return nil }
            if let writer {  // it waits only while nothing is queued: handed over at once, never counted
                self.writer = nil
                return writer
            }
            if case .answer = item { answers += 1 }
            items.append(item)
            return nil
        }
        waiting?.resume(returning: item)
    }

    /// The next packet to write, in order; nil once the RPC ended and what was queued before has been taken.
    func next() async -> Item? {
        let (item, room) = lock.withLock { take() }
        room?.resume()
        if let item { return item }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Item?, Never>) in
                let (now, room): (Item??, CheckedContinuation<Void, Never>?) = lock.withLock {
                    let (item, room) = take()
                    if let item { return (.some(item), room) }
                    if finished { return (.some(nil), nil) }
                    writer = continuation
                    return (nil, nil)
                }
                room?.resume()
                if let now { continuation.resume(returning: now) }
            }
        } onCancel: {
            self.finish()
        }
    }

    /// Returns once fewer than ``answerLimit`` answers wait (at once, usually), or the RPC ended.
    func waitForRoom() async {
        guard lock.withLock({ answers >= Self.answerLimit && !finished }) else { return }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let wait = lock.withLock {
                    guard answers >= Self.answerLimit && !finished else { return false }
                    reader = continuation
                    return true
                }
                if !wait { continuation.resume() }
            }
        } onCancel: {
            self.finish()
        }
    }

    /// The RPC ended: nothing more is queued and waiting tasks return. What was queued before is still handed to
    /// the writer (answers to a client that ended its side in order); a client that is gone fails those writes.
    func finish() {
        let (writer, reader) = lock.withLock {
            finished = true
            let waiting = (self.writer, self.reader)
            self.writer = nil
            self.reader = nil
            return waiting
        }
        writer?.resume(returning: nil)
        reader?.resume()
    }

    /// Under the lock: the first item, and the reader to wake if taking it made room.
    private func take() -> (Item?, CheckedContinuation<Void, Never>?) {
        guard let item = items.popFirst() else { return (nil, nil) }
        guard case .answer = item else { return (item, nil) }
        answers -= 1
        guard answers < Self.answerLimit, let reader else { return (item, nil) }
        self.reader = nil
        return (item, reader)
    }
}
