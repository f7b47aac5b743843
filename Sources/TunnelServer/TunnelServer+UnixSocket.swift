import Foundation
import NIOCore
import NIOPosix
import TunnelPKI
import TunnelSupport
import TunnelWire

#if canImport(Glibc)
import Glibc
#endif

/// The Unix-socket listener (`--uds-path`) for callers on the same machine.
extension TunnelServer {
    /// Listens on a Unix socket readable and writable by the owner only; a stale socket file is replaced.
    ///
    /// The socket is created and bound here and handed to NIO bound: NIO removes the file of a socket it bound
    /// itself when the channel closes, whoever's file it is by then (see ``removeOwnUnixSocket(path:)``).
    func bindUnixSocket(path: String) async throws -> Channel {
        let fd = try listeningUnixSocket(path: path, flag: "--uds-path")
        let core = self.core
        let gate = makeGate("uds", tls: false)
        return try await ServerBootstrap(group: group)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelOption(.recvAllocator, value: SocketTuning.receiveAllocator)
            .childChannelOption(.maxMessagesPerRead, value: SocketTuning.streamSocketReads)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(gate.handler())
                    try channel.pipeline.syncOperations.addHandler(HostRouter(server: core, mode: .plain))
                }
            }
            .withBoundSocket(fd).get()
    }

    /// A socket bound to `path` and listening, readable and writable by the owner only (it is created under a
    /// restrictive umask, so it is never reachable by others); a stale socket file is replaced, any other file is
    /// refused naming `flag`. Its device and inode are kept for ``removeOwnUnixSocket(path:)``.
    func listeningUnixSocket(path: String, flag: String) throws -> Int32 {
        var info = stat()
        if lstat(path, &info) == 0 {
            guard (info.st_mode & S_IFMT) == S_IFSOCK else {
                throw ConfigurationError("\(flag) \(path) exists and is not a socket")
            }
            unlink(path)
        }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw ConfigurationError("\(flag) \(path) is longer than a Unix socket path may be")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ConfigurationError("\(flag) \(path): cannot create a socket (errno \(errno))") }
        let previous = umask(0o177)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        let bindError = errno
        umask(previous)
        guard bound == 0, listen(fd, 1024) == 0 else {
            close(fd)
            throw ConfigurationError("\(flag) \(path): cannot listen (\(String(cString: strerror(bindError))))")
        }
        chmod(path, 0o600)
        var created = stat()
        if lstat(path, &created) == 0 {
            lock.withLock { socketIdentities[path] = (UInt(created.st_dev), UInt(created.st_ino)) }
        }
        return fd
    }

    static func isLoopback(_ address: String) -> Bool {
        guard let ip = IPAddress(address) else { return address == "localhost" }
        return ip.isLoopback
    }

    /// Removes the Unix socket file if it is still ours: during a rolling restart on a shared path the next
    /// server may already have replaced it, and removing that one would cut off every co-located caller.
    func removeOwnUnixSocket(path: String) {
        guard let identity = lock.withLock({ socketIdentities[path] }) else { return }
        var info = stat()
        guard lstat(path, &info) == 0, UInt(info.st_dev) == identity.device, UInt(info.st_ino) == identity.inode else {
            return
        }
        unlink(path)
    }
}
