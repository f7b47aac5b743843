import Logging
import NIOCore
import NIOHTTP1

/// Answers with an HTTP status and a one-line reason as raw bytes, then closes.
enum HTTPErrorResponse {
    struct Failure: Error, CustomStringConvertible { let description: String }

    static func send(_ context: ChannelHandlerContext, _ status: Int, _ message: String, logger: Logger) {
        guard context.channel.isActive else { return }
        let status = (400...599).contains(status) ? status : 502  // NIO traps on some codes; errors only here
        logger.info(
            "answered \(status): \(message)",
            metadata: [
                "remote": "\(context.channel.remoteAddress?.description ?? "?")"
            ])
        let body = message + "\n"
        let phrase = HTTPResponseStatus(statusCode: status).reasonPhrase
        var buffer = context.channel.allocator.buffer(capacity: 128 + body.utf8.count)
        buffer.writeString("HTTP/1.1 \(status) \(phrase)\r\n")
        buffer.writeString("Content-Type: text/plain; charset=utf-8\r\nContent-Length: \(body.utf8.count)\r\n")
        buffer.writeString("Connection: close\r\n\r\n\(body)")
        context.writeAndFlush(NIOAny(buffer)).whenComplete { _ in context.close(promise: nil) }
        // A peer that does not read (or never finished its TLS handshake, which holds the write back) is
        // closed anyway: an answer owed must not keep a socket open.
        let channel = context.channel
        context.eventLoop.scheduleTask(in: .seconds(2)) { channel.close(promise: nil) }
    }
}
