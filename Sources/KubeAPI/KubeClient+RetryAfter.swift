import NIOConcurrencyHelpers
import NIOCore

/// `Retry-After`, as kube-apiserver sends it and client-go honours it: on a 429 (max-in-flight or API Priority
/// and Fairness: "Too many requests, please try again later.") and on a 5xx that carries one (a `ServerTimeout`,
/// a 504 `Timeout`, a 503), the header says how many seconds to wait before asking again.
extension KubeClient {
    /// Times a request is asked again after a `Retry-After` before its answer is returned (client-go's default).
    static let maxRetries = 10
    /// The longest `Retry-After` honoured: a longer one (kube-apiserver sends 1 to a few seconds) is cut to it,
    /// so that a broken header cannot stop the replica's renewals and watches for hours.
    static let longestRetryAfter = TimeAmount.seconds(120)

    /// The wait a `Retry-After` header asks for on an answer with `status`; nil when there is none to honour
    /// (another status, no header, or the HTTP-date form, which kube-apiserver never sends).
    static func retryAfter(status: Int, header: String?) -> TimeAmount? {
        guard status == 429 || (500...599).contains(status), let header,
            let seconds = Int64(header.trimmingCharacters(in: .whitespaces)), seconds >= 0
        else { return nil }
        return min(.seconds(seconds), longestRetryAfter)
    }

    /// Until when the API server at each `host:port` said to wait: shared by every client of it in this process
    /// (the server makes one per follower), as the server asked this process, not one request, to slow down.
    private static let holds = NIOLockedValueBox<[String: NIODeadline]>([:])

    private var holdKey: String { "\(config.host):\(config.port)" }

    /// No request goes to this API server for `delay` from now (or longer, if it said so before).
    func holdRequests(for delay: TimeAmount) {
        let until = NIODeadline.now() + delay
        let key = holdKey
        Self.holds.withLockedValue { holds in holds[key] = max(holds[key] ?? until, until) }
    }

    /// How long requests to this API server must still wait; nil when they may go now.
    var heldFor: TimeAmount? {
        let key = holdKey
        guard let until = Self.holds.withLockedValue({ $0[key] }) else { return nil }
        let left = until - .now()
        return left > .zero ? left : nil
    }

    /// Waits until the API server's last `Retry-After` has passed (throws if the task is cancelled meanwhile).
    func waitForRetryAfter() async throws {
        while let left = heldFor {
            try await Task.sleep(nanoseconds: UInt64(left.nanoseconds))
        }
    }
}
