import ArgumentParser
import Foundation
import TunnelPKI

struct TokenCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "token",
        abstract: "Manage bootstrap tokens with which agents join (only their hashes are stored).",
        subcommands: [Create.self, List.self, Delete.self]
    )
}

extension TokenCommand {
    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a token and print it (once).")

        @OptionGroup var state: JoinStateOption

        @Option(help: "How long the token is valid, e.g. 24h, 30m, 7d; 0 for never.")
        var ttl: String = "24h"

        @Option(help: "A note stored with the token.")
        var description: String?

        @Option(
            name: .customLong("node"),
            help: "A node name (or prefix*) that may join with this token; repeatable. Default: any name.")
        var nodes: [String] = []

        @Option(
            name: .customLong("node-cidr"),
            help: "A network whose addresses joining nodes may claim as node IPs; repeatable. Default: none.")
        var nodeCIDRs: [String] = []

        func run() async throws {
            try await reportingErrors {
                let ttl = try Durations.parse(self.ttl, what: "--ttl")
                let (token, _) = try await state.store().createToken(
                    ttl: ttl, description: description, nodes: nodes.isEmpty ? nil : nodes,
                    nodeCIDRs: nodeCIDRs.isEmpty ? nil : nodeCIDRs)
                print(token)
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List tokens: id, expiry, description.")

        @OptionGroup var state: JoinStateOption

        @Option(help: "text or json.")
        var output: OutputFormat = .text

        func run() async throws {
            try await reportingErrors {
                let tokens = try await state.store().tokens()
                let now = Date()
                switch output {
                case .json:
                    struct Row: Encodable {
                        var id: String
                        var created: Date
                        var expires: Date?
                        var expired: Bool
                        var description: String?
                        var nodes: [String]?
                        var nodeCIDRs: [String]?
                    }
                    let rows = tokens.map {
                        Row(
                            id: $0.id, created: $0.created, expires: $0.expires, expired: $0.isExpired(at: now),
                            description: $0.description, nodes: $0.nodes, nodeCIDRs: $0.nodeCIDRs)
                    }
                    let encoder = JSONEncoder()
                    encoder.dateEncodingStrategy = .iso8601
                    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                    print(String(decoding: try encoder.encode(rows), as: UTF8.self))
                case .text:
                    var table = [["ID", "TTL", "EXPIRES", "DESCRIPTION"]]
                    for token in tokens {
                        let ttl: String
                        let expires: String
                        if let date = token.expires {
                            ttl = token.isExpired(at: now) ? "expired" : Durations.format(date.timeIntervalSince(now))
                            expires = Timestamps.iso8601(date)
                        } else {
                            ttl = "<forever>"
                            expires = "<never>"
                        }
                        table.append([token.id, ttl, expires, token.description ?? ""])
                    }
                    print(TextTable.render(table))
                }
            }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a token by its id (or the whole token).")

        @OptionGroup var state: JoinStateOption

        @Argument(help: "The token id (the 6 characters before the dot) or the whole token.")
        var token: String

        func run() async throws {
            try await reportingErrors {
                let id = String(token.split(separator: ".", maxSplits: 1).first ?? "")
                try await state.store().deleteToken(id: id)
                print("deleted bootstrap token \(id)")
            }
        }
    }
}

/// Left-aligned columns separated by three spaces, like kubectl's tables.
enum TextTable {
    static func render(_ rows: [[String]]) -> String {
        guard let first = rows.first else { return "" }
        var widths = Array(repeating: 0, count: first.count)
        for row in rows {
            for (index, cell) in row.enumerated() where index < widths.count {
                widths[index] = max(widths[index], cell.count)
            }
        }
        return rows.map { row in
            row.enumerated().map { index, cell in
                index == row.count - 1 ? cell : cell.padding(toLength: widths[index] + 3, withPad: " ", startingAt: 0)
            }.joined()
        }.joined(separator: "\n")
    }
}
