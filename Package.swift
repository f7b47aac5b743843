// swift-tools-version: 6.2
import PackageDescription

// The data plane hops between event loops with explicit `execute` calls; Swift 5 mode keeps the
// handler code free of Sendable ceremony while the threading rules are stated in each type's docs.
let swift5: [SwiftSetting] = [.swiftLanguageMode(.v5)]

// The agent runs on every edge node, often small boxes, so its memory counts (docs/benchmarks.md). Linked
// against the Swift libraries statically, only the code it uses is mapped — not all of Foundation and ICU
// (6 MiB resident when shared). lld resolves the static libraries in any order; packed relative relocations
// keep the loader from reading 2.6 MB of relocation entries at start, and without --export-dynamic the
// binary has no 28,000-symbol dynamic table to map. The binary stays position-independent (ASLR).
// The server is linked the same way: idle 24 MiB instead of 34 (docs/benchmarks.md), and it runs one replica
// per cloud node at scale.
let leanLinking: [LinkerSetting] = [
    .unsafeFlags(
        [
            "-static-stdlib", "-use-ld=lld",
            "-l_FoundationICU", "-l_FoundationCollections", "-l_FoundationCShims", "-lCoreFoundation",
            "-lswiftSynchronization", "-lstdc++",
            "-Xlinker", "-z", "-Xlinker", "pack-relative-relocs", "-Xlinker", "--no-export-dynamic",
        ],
        .when(platforms: [.linux])
    )
]

// What the server, the agent and their shared support module build on: NIO with TLS and HTTP/1, logs, metrics.
let networking: [Target.Dependency] = [
    .product(name: "NIOCore", package: "swift-nio"),
    .product(name: "NIOPosix", package: "swift-nio"),
    .product(name: "NIOHTTP1", package: "swift-nio"),
    .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
    .product(name: "NIOSSL", package: "swift-nio-ssl"),
    .product(name: "NIOTLS", package: "swift-nio"),
    .product(name: "Logging", package: "swift-log"),
    .product(name: "Prometheus", package: "swift-prometheus"),
]

// Fuzzing (scripts/fuzz): with EDGETUNNEL_FUZZ set, our own targets are built with libFuzzer's coverage
// instrumentation and the libFuzzer targets under Fuzz/ are declared. Use a scratch path of its own
// (.build-fuzz): the flags differ from the normal build's.
let fuzzing = Context.environment["EDGETUNNEL_FUZZ"] != nil
let fuzzFlags: [SwiftSetting] = fuzzing ? [.unsafeFlags(["-sanitize=fuzzer"])] : []
let fuzzTargets: [Target] =
    !fuzzing
    ? []
    : [
        (
            "FuzzWire",
            [
                "TunnelWire", .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]
        ),
        (
            "FuzzRequestHead",
            [
                "TunnelServer", "TunnelWire", .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"), .product(name: "NIOHTTP1", package: "swift-nio"),
            ]
        ),
        ("FuzzConfig", ["TunnelServer", "EdgePlan"]),
        ("FuzzSecurityGroup", ["EdgePlan", "TunnelPKI"]),
        ("FuzzJoin", ["TunnelPKI", "TunnelWire", .product(name: "NIOCore", package: "swift-nio")]),
    ].map { (name: String, dependencies: [Target.Dependency]) in
        .executableTarget(
            name: name, dependencies: ["FuzzSupport"] + dependencies, path: "Fuzz/\(name)",
            swiftSettings: swift5 + fuzzFlags, linkerSettings: [.unsafeFlags(["-sanitize=fuzzer", "-use-ld=lld"])])
    } + [.target(name: "FuzzSupport", path: "Fuzz/FuzzSupport")]

let package = Package(
    name: "EdgeTunnel",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "edgetunnel", targets: ["edgetunnel"]),
        .executable(name: "edge-tunnel-server", targets: ["edge-tunnel-server"]),
        .executable(name: "edge-tunnel-agent", targets: ["edge-tunnel-agent"]),
        .library(name: "TunnelPKI", targets: ["TunnelPKI"]),
        .library(name: "TunnelWire", targets: ["TunnelWire"]),
        .library(name: "TunnelServer", targets: ["TunnelServer"]),
        .library(name: "TunnelAgent", targets: ["TunnelAgent"]),
        .library(name: "EdgePlan", targets: ["EdgePlan"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-certificates", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-asn1", from: "1.7.4"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        // The konnectivity-compatible gRPC frontend (--grpc-uds-path): its code is generated from Protos/ once
        // and committed (scripts/generate-grpc), so no build runs protoc or its plugins.
        .package(url: "https://github.com/grpc/grpc-swift-2", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport", from: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0"),
    ],
    targets: [
        .target(
            name: "TunnelPKI",
            dependencies: [
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ],
            swiftSettings: fuzzFlags
        ),
        .target(
            name: "EdgePlan",
            dependencies: [
                "TunnelPKI", "TunnelSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Yams", package: "Yams"),
            ],
            swiftSettings: swift5 + fuzzFlags
        ),
        .target(
            name: "TunnelWire",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Atomics", package: "swift-atomics"),
            ],
            swiftSettings: swift5 + fuzzFlags
        ),
        .target(
            name: "TunnelSupport",
            dependencies: [
                "TunnelPKI", "TunnelWire",
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ] + networking,
            swiftSettings: swift5 + fuzzFlags
        ),
        .target(
            name: "KubeAPI",
            dependencies: ["TunnelSupport", "TunnelPKI", .product(name: "Crypto", package: "swift-crypto")]
                + networking,
            swiftSettings: swift5
        ),
        .target(
            name: "TunnelServer",
            dependencies: [
                "KubeAPI", "TunnelPKI", "TunnelWire", "TunnelSupport",
                .product(name: "Yams", package: "Yams"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2Posix", package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ] + networking,
            swiftSettings: swift5 + fuzzFlags
        ),
        .target(
            name: "TunnelAgent",
            dependencies: [
                "TunnelPKI", "TunnelWire", "TunnelSupport",
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ] + networking,
            swiftSettings: swift5 + fuzzFlags
        ),
        // What only the CLI's tools use (bench, demo, forward): kept out of the libraries the server and the agent
        // link, so that neither carries NIOEmbedded or a swarm of agents.
        .target(
            name: "EdgeTunnelTools",
            dependencies: [
                "TunnelPKI", "TunnelWire", "TunnelSupport", "TunnelServer", "TunnelAgent",
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2Posix", package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
            ] + networking,
            swiftSettings: swift5
        ),
        .executableTarget(
            name: "edgetunnel",
            dependencies: [
                "TunnelPKI", "TunnelSupport", "TunnelServer", "TunnelAgent", "EdgePlan", "KubeAPI", "EdgeTunnelTools",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swift5
        ),
        .executableTarget(
            name: "edge-tunnel-server",
            dependencies: [
                "TunnelServer", "TunnelSupport", "TunnelPKI", "KubeAPI",
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swift5,
            linkerSettings: leanLinking
        ),
        .executableTarget(
            name: "edge-tunnel-agent",
            dependencies: [
                "TunnelAgent", "TunnelPKI", "TunnelSupport",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swift5,
            linkerSettings: leanLinking
        ),
        .testTarget(name: "TunnelPKITests", dependencies: ["TunnelPKI"]),
        .testTarget(
            name: "TunnelServerTests",
            dependencies: [
                "TunnelServer", "TunnelSupport", "TunnelPKI", "TunnelWire", "KubeAPI",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: swift5
        ),
        .testTarget(
            name: "EdgePlanTests",
            dependencies: ["EdgePlan", "TunnelPKI", "TunnelSupport", .product(name: "Yams", package: "Yams")],
            swiftSettings: swift5),
        .testTarget(
            name: "TunnelSupportTests",
            dependencies: [
                "TunnelSupport", "TunnelPKI", .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            swiftSettings: swift5
        ),
        .testTarget(
            name: "TunnelAgentTests",
            dependencies: [
                "TunnelAgent", "TunnelPKI", "TunnelSupport", .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: swift5
        ),
        .testTarget(
            name: "KubeAPITests",
            dependencies: ["KubeAPI"],
            swiftSettings: swift5
        ),
        .testTarget(
            name: "TunnelWireTests",
            dependencies: [
                "TunnelWire",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                // Real loops and sockets for the takeover across event loops (CrossLoopResumeTests).
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: swift5
        ),
    ] + fuzzTargets
)
