import NIOCore
import NIOPosix
import TunnelWire

extension ServerBootstrap {
    /// The options of a TCP listener whose connections carry stream bytes (the server's ports and
    /// `edgetunnel forward`): a deep backlog, address reuse, no Nagle delay, adaptive reads of up to 256 KiB,
    /// and half-close passed on unless `halfClosure` is false. `oneStream`: each connection is one stream's
    /// socket (every listener but the tunnel port), read once per readable event (``SocketTuning/streamSocketReads``).
    public func streamListener(halfClosure: Bool = true, oneStream: Bool = true) -> ServerBootstrap {
        var bootstrap = self.serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.recvAllocator, value: SocketTuning.receiveAllocator)
        if oneStream {
            bootstrap = bootstrap.childChannelOption(.maxMessagesPerRead, value: SocketTuning.streamSocketReads)
        }
        return halfClosure ? bootstrap.childChannelOption(.allowRemoteHalfClosure, value: true) : bootstrap
    }
}

extension ClientBootstrap {
    /// The options of a TCP connection that carries stream bytes (the agent's tunnel and its dials to targets):
    /// no Nagle delay, adaptive reads of up to 256 KiB, and half-close passed on if `halfClosure`.
    /// `oneStream`: the connection is one stream's socket (a dial to a target), read once per readable event.
    public func streamConnection(halfClosure: Bool, oneStream: Bool = false) -> ClientBootstrap {
        var bootstrap = self.channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelOption(.recvAllocator, value: SocketTuning.receiveAllocator)
        if oneStream { bootstrap = bootstrap.channelOption(.maxMessagesPerRead, value: SocketTuning.streamSocketReads) }
        return halfClosure ? bootstrap.channelOption(.allowRemoteHalfClosure, value: true) : bootstrap
    }
}
