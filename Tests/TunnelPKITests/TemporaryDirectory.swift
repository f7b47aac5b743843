import Foundation

/// A fresh folder under the system's temporary directory, removed when the test is done.
final class TemporaryDirectory {
    let path: String

    init() {
        path = NSTemporaryDirectory() + "edgetunnel-test-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    func file(_ name: String) -> String { "\(path)/\(name)" }

    func write(_ text: String, to name: String) -> String {
        let target = file(name)
        _ = FileManager.default.createFile(atPath: target, contents: Data(text.utf8))
        return target
    }

    /// Names and contents of every file, to show that a failed command changed nothing.
    func snapshot() -> [String: Data] {
        var result: [String: Data] = [:]
        for name in (try? FileManager.default.subpathsOfDirectory(atPath: path)) ?? [] {
            result[name] = FileManager.default.contents(atPath: file(name)) ?? Data()
        }
        return result
    }
}

func mode(of path: String) -> Int {
    let attributes = try! FileManager.default.attributesOfItem(atPath: path)
    return (attributes[.posixPermissions] as! NSNumber).intValue & 0o777
}
