/// The release of these binaries, as `--version` of every executable prints it.
public enum EdgeTunnelVersion {
    public static let current = "0.1.0"
}
