import ArgumentParser
import Foundation
import TunnelPKI

/// `edgetunnel node`: the node identities the server has issued, and the operator's two levers over them.
struct NodeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node",
        abstract: "List joined nodes; let a re-installed node join again (reset) or cut a node off (revoke).",
        subcommands: [List.self, Reset.self, Revoke.self]
    )
}

extension NodeCommand {
    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the nodes that joined, were reset or revoked.")

        @OptionGroup var state: JoinStateOption

        @Option(help: "text or json.")
        var output: OutputFormat = .text

        func run() async throws {
            try await reportingErrors {
                let nodes = try await state.store().nodes()
                switch output {
                case .json:
                    let encoder = JSONEncoder()
                    encoder.dateEncodingStrategy = .iso8601
                    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                    print(String(decoding: try encoder.encode(nodes), as: UTF8.self))
                case .text:
                    var table = [["NODE", "STATE", "JOINED", "IPS"]]
                    for node in nodes {
                        let state = node.revoked != nil ? "revoked" : node.joined != nil ? "joined" : "may join"
                        table.append([
                            node.name, state, node.joined.map(Timestamps.iso8601) ?? "",
                            node.ips.joined(separator: ","),
                        ])
                    }
                    print(TextTable.render(table))
                }
            }
        }
    }

    struct Reset: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Let NAME join again with a bootstrap token; every certificate issued to it so far stops working."
        )

        @OptionGroup var state: JoinStateOption

        @Argument(help: "The node name.")
        var name: String

        func run() async throws {
            try await reportingErrors {
                try await state.store().reset(name)
                print("node \(name) may join again; its earlier certificates are void")
            }
        }
    }

    struct Revoke: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract:
                "Cut NAME off: its tunnel closes within seconds, its certificate is refused, it cannot renew or join.")

        @OptionGroup var state: JoinStateOption

        @Argument(help: "The node name.")
        var name: String

        func run() async throws {
            try await reportingErrors {
                let store = try state.store()
                try await store.revoke(name)
                print("node \(name) is revoked: servers using \(store.location) close its tunnel within seconds")
            }
        }
    }
}
