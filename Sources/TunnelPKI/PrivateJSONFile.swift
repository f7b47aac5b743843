import Foundation

/// A small JSON document kept private in a PKI folder (`tokens.json`, `nodes.json`): read whole, written whole
/// and atomically with mode 0600 (the folder 0700), dates in ISO 8601, keys sorted so that diffs stay small.
enum PrivateJSONFile {
    /// The document at `path`, or nil when there is no file yet; `what` names it in the error for bad JSON.
    static func read<T: Decodable>(_ type: T.Type, from path: String, what: String) throws -> T? {
        guard AtomicFile.exists(path) else { return nil }
        let bytes = try AtomicFile.read(path)
        do {
            return try decoder.decode(T.self, from: Data(bytes))
        } catch {
            throw PKIError(.invalidArgument, "\(path): \(what) is not valid JSON (\(error))")
        }
    }

    static func write<T: Encodable>(_ value: T, to path: String) throws {
        let data: Data
        do {
            data = try encoder.encode(value)
        } catch {
            throw PKIError(.writeFailed, "cannot encode \(path): \(error)")
        }
        try AtomicFile.makeDirectory(FilePath.directory(of: path), mode: 0o700)
        try AtomicFile.write(Array(data) + [UInt8(ascii: "\n")], to: path, mode: 0o600)
    }

    private static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return encoder
    }()

    private static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }()
}
