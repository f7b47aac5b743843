import Foundation
import NIOCore

/// The protocol version this build speaks. 2: OPEN and OPEN_OK became binary. 3: tunnels may be resumed
/// (``HelloOK/resumeToken``, ``Hello/resumeTokens``, RESUME); a version-2 agent is still served, without that.
public let tunnelProtocolVersion = 3
/// The oldest agent version a server still registers.
public let oldestAgentProtocolVersion = 2
/// The most resume tokens a HELLO may carry: one per replica whose tunnel the agent holds suspended.
public let maxResumeTokens = 16

/// Control messages travel as JSON payloads: they are rare, easy to extend, and easy to read in a capture.
/// OPEN and OPEN_OK (one per stream), DATA, WINDOW, FIN, RST, PING and PONG have binary payloads (see
/// docs/PROTOCOL.md).
public protocol ControlMessage: Codable, Sendable {
    static var frameType: FrameType { get }
    /// This message as a frame on `streamID` (JSON unless the message has a binary layout).
    func frame(streamID: UInt32, allocator: ByteBufferAllocator) -> Frame
    /// Decodes this message from a frame's payload, with an error that names the frame type.
    init(frame: Frame) throws
}

extension ControlMessage {
    /// This message as a frame on `streamID`.
    public func frame(streamID: UInt32 = 0, allocator: ByteBufferAllocator = ByteBufferAllocator()) -> Frame {
        let bytes = (try? JSONEncoder().encode(self)) ?? Data("{}".utf8)
        var buffer = allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        return Frame(type: Self.frameType, streamID: streamID, payload: buffer)
    }

    /// Decodes this message from a frame's payload, with an error that names the frame type.
    public init(frame: Frame) throws {
        do {
            self = try JSONDecoder().decode(Self.self, from: Data(frame.payload.readableBytesView))
        } catch {
            throw FrameError("malformed \(Self.frameType) payload on stream \(frame.streamID)")
        }
    }
}

/// Agent → server, first frame on a tunnel connection.
public struct Hello: ControlMessage, Equatable {
    public static let frameType = FrameType.hello
    public var version: Int
    public var nodeName: String
    public var nodeIPs: [String]
    public var capabilities: [String]
    /// The server replicas this agent already holds a tunnel to: a replica named here refuses at once
    /// (``Refused/duplicate``) instead of registering a second tunnel of the node. Nil when there are none.
    public var haveServers: [String]?
    /// The tokens of this agent's suspended tunnels (``HelloOK/resumeToken``): the replica that holds one of
    /// them resumes that tunnel's streams on this connection (version 3).
    public var resumeTokens: [String]?
    /// The edge node pool the agent declares (`--pool`, `EDGE_TUNNEL_POOL`): a DNS label of at most 63 characters,
    /// or the server refuses the HELLO. With `--node-objects` the Node's pool label counts instead. Nil: none
    /// declared (agents before this field).
    public var pool: String?
    /// How this connection reaches the server: `private` (the line) or `internet`, as the agent sees its address
    /// list. Any other value, or none (agents before this field), is shown as `unknown`.
    public var path: String?
    public init(
        version: Int = tunnelProtocolVersion, nodeName: String, nodeIPs: [String], capabilities: [String] = [],
        haveServers: [String]? = nil, resumeTokens: [String]? = nil, pool: String? = nil, path: String? = nil
    ) {
        self.version = version
        self.nodeName = nodeName
        self.nodeIPs = nodeIPs
        self.capabilities = capabilities
        self.haveServers = haveServers
        self.resumeTokens = resumeTokens
        self.pool = pool
        self.path = path
    }
}

/// Server → agent: the registration is accepted.
public struct HelloOK: ControlMessage, Equatable {
    public static let frameType = FrameType.helloOK
    public var serverID: String
    public var maxFramePayload: Int
    public var pingIntervalSeconds: Double
    /// How many server replicas there are: the agent keeps one tunnel to each. Nil (older servers): one.
    public var serverCount: Int?
    /// Version 3: the tunnel is resumable. The agent names this token in a later HELLO to resume its streams on
    /// a new connection within `resumeGraceSeconds` of losing this one. Nil: not resumable.
    public var resumeToken: String?
    public var resumeGraceSeconds: Double?
    /// This connection resumes the agent's suspended tunnel: the server's RESUME follows.
    public var resumed: Bool?
    public init(
        serverID: String, maxFramePayload: Int = Frame.maxPayload, pingIntervalSeconds: Double, serverCount: Int? = nil,
        resumeToken: String? = nil, resumeGraceSeconds: Double? = nil, resumed: Bool? = nil
    ) {
        self.serverID = serverID
        self.maxFramePayload = maxFramePayload
        self.pingIntervalSeconds = pingIntervalSeconds
        self.serverCount = serverCount
        self.resumeToken = resumeToken
        self.resumeGraceSeconds = resumeGraceSeconds
        self.resumed = resumed
    }
}

/// Server → agent, whenever the number of server replicas changes (``HelloOK/serverCount`` says it at
/// registration): the agent dials more tunnels when it grew, and stops dialing when it shrank.
public struct ServerCount: ControlMessage, Equatable {
    public static let frameType = FrameType.serverCount
    public var count: Int
    public init(count: Int) { self.count = count }
}

/// The longest reason (in characters) a REFUSED, OPEN_FAIL or GOAWAY we build carries: reasons quote peer
/// input, and JSON escaping can make each character six bytes, so an unbounded reason could exceed the frame
/// limit. Peer strings inside a reason are shortened further where they are quoted (``PeerText``).
public let maxReasonLength = 1024

/// Either side: the connection is refused or being closed, and why. The sender closes after it.
public struct Refused: ControlMessage, Equatable {
    public static let frameType = FrameType.refused
    public var reason: String
    /// The agent already holds a tunnel to this replica (it named it in ``Hello/haveServers``): not an error,
    /// the agent dials again for another replica.
    public var duplicate: Bool?
    /// Why, for a program: ``Refused/unsupportedVersion`` when the agent's protocol version is not spoken (it
    /// falls back to the previous one). The reason is text for people, and quotes what the agent sent.
    public var code: String?
    public init(reason: String, duplicate: Bool? = nil, code: String? = nil) {
        self.reason = PeerText.bounded(reason, limit: maxReasonLength)
        self.duplicate = duplicate
        self.code = code.map { PeerText.bounded($0, limit: 64) }
    }

    /// ``code`` of a refusal of the agent's protocol version.
    public static let unsupportedVersion = "unsupported_version"

    /// Whether this refuses protocol `version`: by its code, or, from a server of version 2 (which sends no code),
    /// by the whole start of that server's own sentence. Never by a substring: other reasons quote Node addresses
    /// and names, which whoever can write a Node chooses.
    public func refusesProtocolVersion(_ version: Int) -> Bool {
        if let code { return code == Self.unsupportedVersion }
        return reason.hasPrefix("protocol version \(version) is not supported (server speaks ")
    }
}

/// Server → agent: open stream `streamID` to `target` (`host:port`). `window` is the server's initial receive
/// window for the stream: how many DATA bytes the agent may send before the first WINDOW update.
///
/// Binary, unlike the other control messages: one is sent per stream, and JSON coding was a measurable share
/// of the cost of opening thousands of streams a second. Payload: window u32, then the target in UTF-8.
public struct Open: ControlMessage, Equatable {
    public static let frameType = FrameType.open
    public var target: String
    public var window: Int
    public init(target: String, window: Int) {
        self.target = target
        self.window = window
    }

    public func frame(streamID: UInt32 = 0, allocator: ByteBufferAllocator = ByteBufferAllocator()) -> Frame {
        var buffer = allocator.buffer(capacity: 4 + target.utf8.count)
        buffer.writeInteger(UInt32(clamping: window))
        buffer.writeString(target)
        return Frame(type: Self.frameType, streamID: streamID, payload: buffer)
    }

    public init(frame: Frame) throws {
        var payload = frame.payload
        guard let window = payload.readInteger(as: UInt32.self), payload.readableBytes > 0,
            let target = String(validating: payload.readableBytesView, as: UTF8.self)
        else { throw FrameError("malformed \(Self.frameType) payload on stream \(frame.streamID)") }
        self.init(target: target, window: Int(window))
    }
}

/// Agent → server: the target is dialled; `window` is the agent's initial receive window. Binary: window u32.
public struct OpenOK: ControlMessage, Equatable {
    public static let frameType = FrameType.openOK
    public var window: Int
    public init(window: Int) { self.window = window }

    public func frame(streamID: UInt32 = 0, allocator: ByteBufferAllocator = ByteBufferAllocator()) -> Frame {
        var buffer = allocator.buffer(capacity: 4)
        buffer.writeInteger(UInt32(clamping: window))
        return Frame(type: Self.frameType, streamID: streamID, payload: buffer)
    }

    public init(frame: Frame) throws {
        guard frame.payload.readableBytes == 4,
            let window = frame.payload.getInteger(at: frame.payload.readerIndex, as: UInt32.self)
        else { throw FrameError("malformed \(Self.frameType) payload on stream \(frame.streamID)") }
        self.init(window: Int(window))
    }
}

/// Agent → server: the stream could not be opened. Codes follow HTTP's meaning so the server can answer a
/// CONNECT with them as is: 403 refused by policy, 502 target refused or unreachable, 504 dial timeout.
/// `limit` names the limit that refused the stream, when one did (`streams_per_agent`, `pending_opens`,
/// `buffer_budget`): the server counts it in `edge_tunnel_server_limit_hits_total`.
public struct OpenFail: ControlMessage, Equatable {
    public static let frameType = FrameType.openFail
    public var code: Int
    public var reason: String
    public var limit: String?
    public init(code: Int, reason: String, limit: String? = nil) {
        self.code = code
        self.reason = PeerText.bounded(reason, limit: maxReasonLength)
        self.limit = limit.map { PeerText.bounded($0, limit: 64) }
    }
}

/// Server → agent: no new streams on this connection; open ones may finish.
public struct GoAway: ControlMessage, Equatable {
    public static let frameType = FrameType.goaway
    public var reason: String
    public init(reason: String) { self.reason = PeerText.bounded(reason, limit: maxReasonLength) }
}

/// Agent → server on a connection without a client certificate: the bootstrap join.
/// `nodeIPs` become the certificate's IP SANs, within the networks the token allows; they are the only node
/// IPs the node may claim in HELLO. (Agents before this field existed send none.)
public struct JoinRequest: ControlMessage, Equatable {
    public static let frameType = FrameType.join
    public var token: String
    public var nodeName: String
    public var nodeIPs: [String]?
    public var csrPEM: String
    public init(token: String, nodeName: String, nodeIPs: [String] = [], csrPEM: String) {
        self.token = token
        self.nodeName = nodeName
        self.nodeIPs = nodeIPs
        self.csrPEM = csrPEM
    }
}

/// Server → agent: the node's certificate and the CA that signed it.
public struct JoinOK: ControlMessage, Equatable {
    public static let frameType = FrameType.joinOK
    public var certificatePEM: String
    public var caPEM: String
    public init(certificatePEM: String, caPEM: String) {
        self.certificatePEM = certificatePEM
        self.caPEM = caPEM
    }
}

/// Agent → server over the tunnel: a new CSR for the same node, before the certificate expires.
public struct RenewRequest: ControlMessage, Equatable {
    public static let frameType = FrameType.renew
    public var csrPEM: String
    public init(csrPEM: String) { self.csrPEM = csrPEM }
}

/// Server → agent: the renewed certificate.
public struct RenewOK: ControlMessage, Equatable {
    public static let frameType = FrameType.renewOK
    public var certificatePEM: String
    public init(certificatePEM: String) { self.certificatePEM = certificatePEM }
}

/// RST codes.
public enum ResetCode: UInt32, Sendable {
    case cancel = 0
    case protocolError = 1
    case flowControl = 2
    case connectionGone = 3
}

extension Frame {
    /// WINDOW: grant `increment` more bytes on a stream.
    public static func window(streamID: UInt32, increment: UInt32, allocator: ByteBufferAllocator) -> Frame {
        var buffer = allocator.buffer(capacity: 4)
        buffer.writeInteger(increment)
        return Frame(type: .window, streamID: streamID, payload: buffer)
    }

    public static func rst(streamID: UInt32, code: ResetCode, allocator: ByteBufferAllocator) -> Frame {
        var buffer = allocator.buffer(capacity: 4)
        buffer.writeInteger(code.rawValue)
        return Frame(type: .rst, streamID: streamID, payload: buffer)
    }

    public static func fin(streamID: UInt32, allocator: ByteBufferAllocator) -> Frame {
        Frame(type: .fin, streamID: streamID, payload: allocator.buffer(capacity: 0))
    }

    /// PING and PONG carry 8 opaque bytes that the PONG echoes.
    public static func ping(_ type: FrameType, opaque: UInt64, allocator: ByteBufferAllocator) -> Frame {
        var buffer = allocator.buffer(capacity: 8)
        buffer.writeInteger(opaque)
        return Frame(type: type, payload: buffer)
    }

    /// The u32 at the start of the payload (WINDOW increment, RST code).
    public var u32Payload: UInt32? { payload.getInteger(at: payload.readerIndex, as: UInt32.self) }
}
