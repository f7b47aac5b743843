import EdgePlan
import FuzzSupport
import TunnelServer

/// libFuzzer target: arbitrary text as the server's YAML config file (parsed and resolved), a plan input file and a Service
/// manifest for `doctor`: each is refused with an error or accepted, never a trap.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzConfig(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    // The file and then the checks every value of it meets at start and on reload.
    if let file = try? ServerConfigFile.parse(text, path: "fuzz.yaml") {
        _ = try? ServerConfiguration.resolve(flags: ServerConfigFile(), file: file)
    }
    _ = try? PlanFile.parse(text, path: "plan.yaml")
    _ = Doctor.checkService(yaml: text, path: "svc.yaml", mode: .expressConnect)
    return 0
}

runFuzzer { data, size in
    guard let data else { return 0 }
    return fuzzConfig(data, size)
}
