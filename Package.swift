// swift-tools-version: 6.2
import PackageDescription

let package = Package(
    name: "EdgeTunnel",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "edgetunnel", targets: ["edgetunnel"]),
        .library(name: "TunnelPKI", targets: ["TunnelPKI"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-certificates", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-asn1", from: "1.7.4"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        .target(
            name: "TunnelPKI",
            dependencies: [
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ]
        ),
        .executableTarget(
            name: "edgetunnel",
            dependencies: [
                "TunnelPKI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(name: "TunnelPKITests", dependencies: ["TunnelPKI"]),
    ]
)
