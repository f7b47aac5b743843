import Foundation
import NIOCore
import NIOEmbedded
import NIOHTTP1

/// Times the request-head path against NIOHTTP1's decoder on the same heads (`edgetunnel bench heads`), so the
/// choice between them rests on a measurement: what a caller's head costs before its stream is opened.
public enum RequestHeadBenchmark {
    /// A head as kube-apiserver sends it to a kubelet through us (Host-routed, keep-alive).
    public static let sampleHead = Array(
        ("GET /containerLogs/kube-system/coredns-5d78c9869d-abcde/coredns?follow=true&tailLines=10 HTTP/1.1\r\n"
            + "Host: edge-node-3:10250\r\nUser-Agent: kube-apiserver/v1.31.1 (linux/amd64) kubernetes/948afe5\r\n"
            + "Accept: application/json, */*\r\nAuthorization: Bearer abcdefghijklmnopqrstuvwxyz0123456789\r\n"
            + "X-Forwarded-For: 10.0.0.1\r\nAccept-Encoding: gzip\r\n\r\n").utf8)

    /// Nanoseconds per head: (ours: find the end, parse, route; NIOHTTP1's decoder: decode head and end on a
    /// channel, read the Host header).
    public static func run(iterations: Int) throws -> (ours: Double, nio: Double) {
        var routed = 0
        let oursStart = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<iterations {
            guard let end = RequestHead.end(in: sampleHead) else { continue }
            let head = try RequestHead(parsing: sampleHead.prefix(end))
            routed &+= try head.destination(defaultPort: 10250).port
        }
        let ours = Double(DispatchTime.now().uptimeNanoseconds - oursStart) / Double(iterations)

        let channel = EmbeddedChannel(handler: ByteToMessageHandler(HTTPRequestDecoder()))
        var buffer = channel.allocator.buffer(capacity: sampleHead.count)
        let nioStart = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<iterations {
            buffer.clear()
            buffer.writeBytes(sampleHead)
            try channel.writeInbound(buffer)
            while let part = try channel.readInbound(as: HTTPServerRequestPart.self) {
                if case .head(let head) = part, let host = head.headers.first(name: "host") { routed &+= host.utf8.count }
            }
        }
        let nio = Double(DispatchTime.now().uptimeNanoseconds - nioStart) / Double(iterations)
        _ = try channel.finish()
        precondition(routed != 0)
        return (ours, nio)
    }
}
