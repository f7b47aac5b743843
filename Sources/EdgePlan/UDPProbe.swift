import Foundation
import TunnelPKI
import TunnelSupport

#if canImport(Glibc)
import Glibc
#endif

/// `edgetunnel probe udp`: checks that UDP (the VXLAN port 8472 by default) really passes between two hosts
/// before the overlay runs. A responder echoes probe datagrams; the prober sends nonce-stamped datagrams and
/// counts the echoes that carry its nonce.
public enum UDPProbe {
    static let magic = Array("ETPROBE1".utf8)

    public struct Result: Codable, Sendable, Equatable {
        public var target: String
        public var sent: Int
        public var received: Int
        public var rttMillisecondsMin: Double?
        public var rttMillisecondsAvg: Double?
        public var rttMillisecondsMax: Double?
        public var passes: Bool { received > 0 }
    }

    /// Throws unless `text` is `ADDR:PORT` with an IP address.
    public static func validateAddress(_ text: String) throws {
        _ = try socketAddress(text)
    }

    /// Parses `ADDR:PORT` (IPv6 in brackets) into a socket address.
    static func socketAddress(_ text: String) throws -> (storage: sockaddr_storage, length: socklen_t, family: Int32) {
        guard let (host, portText) = HostPort.split(text) else {
            throw PlanError("invalid address \"\(text)\": expected ADDR:PORT")
        }
        guard let ip = IPAddress(String(host)), let port = UInt16(portText), port > 0 else {
            throw PlanError("invalid address \"\(text)\": expected an IP address and a port 1-65535")
        }
        var storage = sockaddr_storage()
        if ip.isIPv4 {
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = port.bigEndian
            withUnsafeMutableBytes(of: &address.sin_addr) { $0.copyBytes(from: ip.bytes) }
            withUnsafeMutableBytes(of: &storage) { raw in withUnsafeBytes(of: address) { raw.copyMemory(from: $0) } }
            return (storage, socklen_t(MemoryLayout<sockaddr_in>.size), AF_INET)
        }
        var address = sockaddr_in6()
        address.sin6_family = sa_family_t(AF_INET6)
        address.sin6_port = port.bigEndian
        withUnsafeMutableBytes(of: &address.sin6_addr) { $0.copyBytes(from: ip.bytes) }
        withUnsafeMutableBytes(of: &storage) { raw in withUnsafeBytes(of: address) { raw.copyMemory(from: $0) } }
        return (storage, socklen_t(MemoryLayout<sockaddr_in6>.size), AF_INET6)
    }

    static func openSocket(family: Int32) throws -> Int32 {
        let fd = socket(family, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw PlanError("cannot open a UDP socket: \(String(cString: strerror(errno)))") }
        return fd
    }

    /// Answers probes on `address` until `shouldStop` returns true (checked at least every 200 ms).
    public static func respond(
        on address: String, shouldStop: @escaping () -> Bool = { false }, ready: () -> Void = {}
    ) throws {
        var (storage, length, family) = try socketAddress(address)
        let fd = try openSocket(family: family)
        defer { close(fd) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let bound = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        guard bound == 0 else {
            throw PlanError("cannot listen on UDP \(address): \(String(cString: strerror(errno)))")
        }
        ready()
        var buffer = [UInt8](repeating: 0, count: 2048)
        while !shouldStop() {
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 200) > 0 else { continue }
            var peer = sockaddr_storage()
            var peerLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let count = buffer.withUnsafeMutableBytes { raw in
                withUnsafeMutablePointer(to: &peer) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        recvfrom(fd, raw.baseAddress, raw.count, 0, $0, &peerLength)
                    }
                }
            }
            // Only probe datagrams are answered: the responder is no reflector for arbitrary traffic.
            guard count >= magic.count + 20, Array(buffer[0..<magic.count]) == magic else { continue }
            _ = buffer.withUnsafeBytes { raw in
                withUnsafePointer(to: &peer) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        sendto(fd, raw.baseAddress, count, 0, $0, peerLength)
                    }
                }
            }
        }
    }

    /// Sends `count` probes to `target`, `interval` apart, and waits up to `timeout` after the last.
    public static func probe(target: String, count: Int, timeout: Double, interval: Double = 0.1) throws -> Result {
        guard count > 0 && count <= 10000 else { throw PlanError("--count must be 1-10000, got \(count)") }
        guard timeout > 0 else { throw PlanError("--timeout must be positive") }
        var (storage, length, family) = try socketAddress(target)
        let fd = try openSocket(family: family)
        defer { close(fd) }
        let connected = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, length) }
        }
        guard connected == 0 else { throw PlanError("cannot reach \(target): \(String(cString: strerror(errno)))") }
        var nonce = [UInt8](repeating: 0, count: 16)
        for index in nonce.indices { nonce[index] = UInt8.random(in: 0...255) }
        var sentAt: [Int: Double] = [:]
        var rtts: [Int: Double] = [:]
        func now() -> Double { Date().timeIntervalSince1970 }
        var next = 0
        var nextSend = now()
        var deadline = now() + Double(count - 1) * interval + timeout
        var buffer = [UInt8](repeating: 0, count: 2048)
        while now() < deadline && rtts.count < count {
            if next < count && now() >= nextSend {
                var datagram = magic + nonce
                withUnsafeBytes(of: UInt32(next).bigEndian) { datagram.append(contentsOf: $0) }
                sentAt[next] = now()
                // ECONNREFUSED (an ICMP port-unreachable from an earlier probe) does not stop the count.
                _ = datagram.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
                next += 1
                nextSend += interval
                if next == count { deadline = now() + timeout }
            }
            let wait = next < count ? max(0, nextSend - now()) : max(0, deadline - now())
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, Int32(min(wait, 0.2) * 1000) + 1) > 0 else { continue }
            let received = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard received == magic.count + 20, Array(buffer[magic.count..<magic.count + 16]) == nonce else { continue }
            let sequence =
                Int(buffer[magic.count + 16]) << 24 | Int(buffer[magic.count + 17]) << 16
                | Int(buffer[magic.count + 18]) << 8 | Int(buffer[magic.count + 19])
            if let sent = sentAt[sequence], rtts[sequence] == nil { rtts[sequence] = (now() - sent) * 1000 }
        }
        let values = Array(rtts.values)
        return Result(
            target: target, sent: next, received: values.count, rttMillisecondsMin: values.min(),
            rttMillisecondsAvg: values.isEmpty ? nil : values.reduce(0, +) / Double(values.count),
            rttMillisecondsMax: values.max())
    }
}
