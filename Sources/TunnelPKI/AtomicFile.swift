#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Whole-file writes that never leave a half-written file behind.
///
/// The bytes go to a temporary file in the same directory, created with the final mode (so a private key
/// is never readable by others, not even for a moment), are flushed to disk, and the temporary file is then
/// renamed over the destination. A reader sees the old file or the new one, never a mix.
public enum AtomicFile {
    /// Writes `bytes` to `path` with permission bits `mode`.
    public static func write(_ bytes: some Collection<UInt8>, to path: String, mode: mode_t) throws(PKIError) {
        let directory = FilePath.directory(of: path)
        let temporary =
            "\(directory)/.\(FilePath.lastComponent(of: path)).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        guard fd >= 0 else {
            throw PKIError(.writeFailed, "cannot write \(path): \(String(cString: strerror(errno)))")
        }
        var ok = false
        defer {
            if !ok { unlink(temporary) }
        }
        // open() applies the umask; the mode must be exact for keys.
        _ = fchmod(fd, mode)
        let array = Array(bytes)
        var written = 0
        while written < array.count {
            let n = array.withUnsafeBytes { raw in
                Glibc.write(fd, raw.baseAddress! + written, raw.count - written)
            }
            if n < 0 {
                if errno == EINTR { continue }
                let reason = String(cString: strerror(errno))
                close(fd)
                throw PKIError(.writeFailed, "cannot write \(path): \(reason)")
            }
            written += n
        }
        if fsync(fd) != 0 || close(fd) != 0 {
            throw PKIError(.writeFailed, "cannot write \(path): \(String(cString: strerror(errno)))")
        }
        guard rename(temporary, path) == 0 else {
            throw PKIError(.writeFailed, "cannot replace \(path): \(String(cString: strerror(errno)))")
        }
        ok = true
        // Make the rename itself durable.
        let dfd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 {
            _ = fsync(dfd)
            close(dfd)
        }
    }

    /// Creates `path` (and its parents) as a directory with `mode` if it does not exist yet.
    public static func makeDirectory(_ path: String, mode: mode_t) throws(PKIError) {
        var isDirectory = stat()
        if stat(path, &isDirectory) == 0 {
            guard (isDirectory.st_mode & S_IFMT) == S_IFDIR else {
                throw PKIError(.writeFailed, "cannot use \(path) as a directory: it is a file")
            }
            return
        }
        let parent = FilePath.directory(of: path)
        if parent != path && parent != "/" && parent != "." {
            try makeDirectory(parent, mode: 0o755)
        }
        if mkdir(path, mode) != 0 && errno != EEXIST {
            throw PKIError(.writeFailed, "cannot create directory \(path): \(String(cString: strerror(errno)))")
        }
        _ = chmod(path, mode)
    }

    /// Reads a whole file, with errors that name it.
    public static func read(_ path: String) throws(PKIError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ENOENT {
                throw PKIError(.fileMissing, "\(path): file does not exist")
            }
            throw PKIError(.fileUnreadable, "\(path): cannot read: \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw PKIError(.fileUnreadable, "\(path): cannot read: \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            result.append(contentsOf: chunk[0..<n])
            if result.count > 16 << 20 {
                throw PKIError(.fileUnreadable, "\(path): larger than 16 MiB, not a PKI file")
            }
        }
        return result
    }

    /// Whether a file exists at `path`.
    public static func exists(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0
    }

    /// What changes whenever the file at `path` is replaced or rewritten (device, inode, size, modification
    /// time); empty when there is none. Cheaper than reading the file to see whether it changed.
    public static func stamp(_ path: String) -> [Int] {
        var info = stat()
        guard stat(path, &info) == 0 else { return [] }
        return [Int(info.st_dev), Int(info.st_ino), Int(info.st_size), info.st_mtim.tv_sec, info.st_mtim.tv_nsec]
    }
}

/// Path helpers without Foundation.
enum FilePath {
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        if slash == path.startIndex { return "/" }
        return String(path[..<slash])
    }

    static func lastComponent(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return path }
        return String(path[path.index(after: slash)...])
    }
}
