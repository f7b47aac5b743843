import EdgePlan
import Foundation
import FuzzSupport
import TunnelPKI

/// libFuzzer target: arbitrary bytes as a DescribeSecurityGroupAttribute export, read and evaluated for UDP
/// 8472 from an edge CIDR.
let edges = [try! CIDR(parsing: "10.240.0.0/16"), try! CIDR(parsing: "fd00::/8")]

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzSecurityGroup(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard let group = try? SecurityGroupExport.load(path: "sg.json", data: Data(bytes: data, count: size)) else {
        return 0
    }
    for edge in edges {
        _ = SecurityGroupVerdict.evaluate(group, protocol: "udp", port: 8472, from: edge)
    }
    _ = Doctor.checkSecurityGroup(group, path: "sg.json", edgeCIDRs: edges)
    return 0
}

runFuzzer { data, size in
    guard let data else { return 0 }
    return fuzzSecurityGroup(data, size)
}
