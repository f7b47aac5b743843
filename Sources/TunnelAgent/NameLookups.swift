import Atomics
import Dispatch
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// The agent's lookups of name targets, made before any connect so that every address can be checked against
/// the allow list first (DNS rebinding; see ``AllowList/allowsResolved(_:port:)``). NIOPosix's own resolver is
/// internal to it, so this is the same thing it does: `getaddrinfo` on one serial queue (one lookup at a time,
/// as NIO does per event loop), every address in getaddrinfo's RFC 6724 order. At most ``maxWaiting`` lookups wait,
/// so a server asking for name after name while DNS is slow cannot queue them without bound.
final class NameLookups: Sendable {
    static let maxWaiting = 64
    private let queue = DispatchQueue(label: "edgetunnel.agent.name-lookups")
    private let waiting = ManagedAtomic<Int>(0)

    /// Every address of `host`, or a failure: ``NameNotResolved``, ``TooManyLookups``, or the connect timeout
    /// when the answer takes longer than `timeout`.
    func resolve(host: String, port: Int, on loop: EventLoop, timeout: TimeAmount) -> EventLoopFuture<[SocketAddress]> {
        guard waiting.loadThenWrappingIncrement(ordering: .relaxed) < Self.maxWaiting else {
            waiting.wrappingDecrement(ordering: .relaxed)
            return loop.makeFailedFuture(TooManyLookups())
        }
        let promise = loop.makePromise(of: [SocketAddress].self)
        let deadline = loop.scheduleTask(in: timeout) { promise.fail(ChannelError.connectTimeout(timeout)) }
        queue.async { [waiting] in
            let result = Result { try Self.addresses(of: host, port: port) }
            waiting.wrappingDecrement(ordering: .relaxed)
            deadline.cancel()
            promise.completeWith(result)  // hops to the loop; a second completion (the timeout's) is ignored
        }
        return promise.futureResult
    }

    /// getaddrinfo's answer for a stream socket, blocking.
    static func addresses(of host: String, port: Int) throws -> [SocketAddress] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, String(port), &hints, &list) == 0, let first = list else { throw NameNotResolved() }
        defer { freeaddrinfo(list) }
        var addresses: [SocketAddress] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let info = cursor?.pointee {
            if let address = info.ai_addr {
                switch info.ai_family {
                case AF_INET:
                    address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) {
                        addresses.append(SocketAddress($0.pointee, host: host))
                    }
                case AF_INET6:
                    address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) {
                        addresses.append(SocketAddress($0.pointee, host: host))
                    }
                default:
                    break
                }
            }
            cursor = info.ai_next
        }
        guard !addresses.isEmpty else { throw NameNotResolved() }
        return addresses
    }
}

/// Hands NIO's Happy Eyeballs connect the addresses already resolved and checked (``NameLookups``).
struct ResolvedAddresses: Resolver, Sendable {
    let loop: EventLoop
    let addresses: [SocketAddress]

    func initiateAQuery(host: String, port: Int) -> EventLoopFuture<[SocketAddress]> {
        loop.makeSucceededFuture(addresses.filter { if case .v4 = $0 { true } else { false } })
    }

    func initiateAAAAQuery(host: String, port: Int) -> EventLoopFuture<[SocketAddress]> {
        loop.makeSucceededFuture(addresses.filter { if case .v6 = $0 { true } else { false } })
    }

    func cancelQueries() {}
}

/// A name target that getaddrinfo could not resolve.
struct NameNotResolved: Error {}

/// More name lookups waiting than ``NameLookups/maxWaiting``.
struct TooManyLookups: Error {}

/// A name target resolved only to addresses the allow list does not allow by address.
struct ResolvedOutsideAllowList: Error {
    let address: String
}
