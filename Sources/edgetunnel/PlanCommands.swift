import ArgumentParser
import EdgePlan
import Foundation
import TunnelPKI
import TunnelSupport
import Yams

/// The exit code of bad input to the plan tools (plan, manifests, doctor, probe): 2, as 1 is their verdict that
/// the plan or a check does not hold. Given to ``reportingErrors(userError:_:)``.
let badInput = ExitCode(2)

func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}

struct PlanCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plan",
        abstract:
            "Decide the network plan of an edge cluster: SNAT, EIP, tunnel Service type, private-line path, security-group rules, per edge node pool.",
        discussion: """
            Inputs come from flags or a YAML file (--file) with the same names in camelCase; flags win. Exit codes: \
            0 the plan holds, 1 it has an error finding (printed with the plan), 2 bad input.
            """
    )

    @Option(
        help:
            "YAML file with connectivity, internetEgress, publicAPIServer, kubernetesVersion, existingCluster, hasEIP, edgeCIDRs, cloudEdgeContainerNetwork, pools."
    )
    var file: String?
    @Option(help: "internet or express-connect (with --pool: each pool's own).") var connectivity: String?
    @Option(
        name: .customLong("pool"),
        help: ArgumentHelp(
            "An edge node pool (repeatable): NAME=express-connect|internet[,cidr=CIDR]...[,selector=KEY=VALUE|,selector-style=openyurt|ack].",
            valueName: "pool"))
    var pools: [String] = []
    @Flag(name: .customLong("internet-egress"), help: "The business needs outbound internet.") var internetEgress =
        false
    @Flag(name: .customLong("public-apiserver"), help: "The API server must be reachable from the internet.")
    var publicAPIServer = false
    @Option(name: .customLong("kubernetes-version"), help: "e.g. 1.22.15 or v1.20.11-aliyun.1") var kubernetesVersion:
        String?
    @Flag(name: .customLong("existing-cluster"), help: "The cluster already exists.") var existingCluster = false
    @Flag(
        name: .customLong("has-eip"), inversion: .prefixedNo,
        help: "Whether the existing cluster got an EIP at creation.")
    var hasEIP: Bool?
    @Option(name: .customLong("edge-cidr"), help: "An edge network (repeatable).") var edgeCIDRs: [String] = []
    @Flag(
        name: .customLong("cloud-edge-container-network"), inversion: .prefixedNo,
        help: "Cloud apps talk to edge apps over the container network (default: yes).")
    var containerNetwork: Bool?
    @Option(name: .customLong("region-id"), help: "Region for the printed aliyun commands.") var regionID: String?
    @Option(name: .customLong("security-group-id"), help: "Security group for the printed aliyun commands.")
    var securityGroupID: String?
    @Option(help: "text or json.") var output: OutputFormat = .text

    func run() throws {
        let plan = try reportingErrors(userError: badInput) {
            try NetworkPlan(input: try input(), regionID: regionID, securityGroupID: securityGroupID)
        }
        switch output {
        case .json: try printJSON(plan)
        case .text: print(plan.text)
        }
        // The plan does not hold: a script (or CI) must not go on as if it did.
        if plan.exitCode != 0 { throw ExitCode(plan.exitCode) }
    }

    func input() throws -> PlanInput {
        var fileInput = PlanFile()
        if let file {
            fileInput = try PlanFile.parse(String(decoding: try AtomicFile.read(file), as: UTF8.self), path: file)
        }
        let flagPools = try pools.map { try EdgePool(flag: $0) }
        let pools = flagPools.isEmpty ? (fileInput.pools ?? []) : flagPools
        guard let versionText = kubernetesVersion ?? fileInput.kubernetesVersion else {
            throw PlanError("--kubernetes-version is required, e.g. 1.22.15")
        }
        let version = try KubernetesVersion(parsing: versionText)
        var input: PlanInput
        if pools.isEmpty {
            guard let connectivityText = connectivity ?? fileInput.connectivity else {
                throw PlanError("--connectivity is required: internet or express-connect (or give --pool)")
            }
            input = PlanInput(connectivity: try Connectivity(parsing: connectivityText), kubernetesVersion: version)
            let cidrs = edgeCIDRs.isEmpty ? (fileInput.edgeCIDRs ?? []) : edgeCIDRs
            input.edgeCIDRs = try cidrs.map { try CIDR(parsing: $0) }
        } else {
            if !edgeCIDRs.isEmpty || fileInput.edgeCIDRs != nil {
                throw PlanError(
                    "\(edgeCIDRs.isEmpty ? "edgeCIDRs" : "--edge-cidr") with pools: give each pool's networks (cidr= or cidrs:)"
                )
            }
            input = PlanInput(pools: pools, kubernetesVersion: version)
            // Checked against the pools by validate(): with pools it may only repeat what they say.
            if let connectivityText = connectivity ?? fileInput.connectivity {
                input.connectivity = try Connectivity(parsing: connectivityText)
            }
        }
        input.internetEgress = internetEgress || (fileInput.internetEgress ?? false)
        input.publicAPIServer = publicAPIServer || (fileInput.publicAPIServer ?? false)
        input.existingCluster = existingCluster || (fileInput.existingCluster ?? false)
        input.hasEIP = hasEIP ?? fileInput.hasEIP
        input.cloudEdgeContainerNetwork = containerNetwork ?? fileInput.cloudEdgeContainerNetwork ?? true
        return input
    }
}

struct DoctorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "doctor",
        abstract:
            "Check a live setup against the plan: one line per check, each failure with its fix; exits 1 when any check fails.",
        discussion: """
            With --pool NAME --expect private|internet, checks on a live server (--server, its meta port) that every \
            agent of the pool is connected over that path, and names those that are not. Exit codes: 0 every check \
            passed, 1 one failed, 2 bad input.
            """
    )

    @Option(help: "internet or express-connect (for the Service check).") var mode: String?
    @Option(name: .customLong("server-address"), help: "A tunnel server address to check over TLS (repeatable).")
    var serverAddresses: [String] = []
    @Option(name: .customLong("ca-file"), help: "The tunnel CA, for the TLS checks.") var caFile: String?
    @Option(name: .customLong("service-file"), help: "The Service as `kubectl get svc -o yaml` prints it.")
    var serviceFile: String?
    @Option(name: .customLong("security-group-file"), help: "DescribeSecurityGroupAttribute JSON export.")
    var securityGroupFile: String?
    @Option(name: .customLong("edge-cidr"), help: "An edge network for the UDP 8472 check (repeatable).") var edgeCIDRs:
        [String] = []
    @Option(name: .customLong("probe-udp"), help: "ADDR:PORT of an `edgetunnel probe udp --listen` responder.")
    var probeUDP: String?
    @OptionGroup var pools: PoolDoctorOptions
    @Option(help: "text or json.") var output: OutputFormat = .text

    func run() async throws {
        let results: [CheckResult] = try await reportingErrors(userError: badInput) {
            var results: [CheckResult] = []
            let cidrs = try edgeCIDRs.map { try CIDR(parsing: $0) }
            let connectivity = try mode.map { try Connectivity(parsing: $0) }
            _ = try pools.expectations()  // bad --pool or --expect input is refused before any check runs
            if !serverAddresses.isEmpty && caFile == nil {
                throw PlanError("--ca-file is required to check --server-address")
            }
            if serviceFile != nil && connectivity == nil {
                throw PlanError("--mode is required to check --service-file")
            }
            if serverAddresses.isEmpty && serviceFile == nil && securityGroupFile == nil && probeUDP == nil
                && !pools.isRequested
            {
                throw PlanError(
                    "nothing to check: give --server-address, --service-file, --security-group-file, --probe-udp or --pool"
                )
            }
            for address in serverAddresses {
                results.append(await Doctor.checkTLS(address: address, caFile: caFile!))
            }
            if let serviceFile, let connectivity {
                let text = String(decoding: try AtomicFile.read(serviceFile), as: UTF8.self)
                results += Doctor.checkService(yaml: text, path: serviceFile, mode: connectivity)
            }
            if let securityGroupFile {
                let group = try SecurityGroupExport.load(
                    path: securityGroupFile, data: Data(try AtomicFile.read(securityGroupFile)))
                results += Doctor.checkSecurityGroup(group, path: securityGroupFile, edgeCIDRs: cidrs)
            }
            if let probeUDP {
                try UDPProbe.validateAddress(probeUDP)
                results.append(Doctor.checkUDP(target: probeUDP))
            }
            results += try await pools.results()
            return results
        }
        switch output {
        case .json:
            try printJSON(results)
        case .text:
            for result in results { print(result.line) }
            let failed = results.filter { $0.status == .fail }.count
            print(failed == 0 ? "all \(results.count) checks passed" : "\(failed) of \(results.count) checks failed")
        }
        if results.contains(where: { $0.status == .fail }) { throw ExitCode(1) }
    }
}

struct ProbeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "probe", abstract: "Check that traffic passes between two hosts.", subcommands: [UDP.self])

    struct UDP: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "udp",
            abstract:
                "Answer probes (--listen) or send nonce-stamped probes and count the echoes (--target); default port 8472 (VXLAN)."
        )

        @Option(help: "ADDR:PORT to answer probes on.") var listen: String?
        @Option(help: "ADDR:PORT of a responder.") var target: String?
        @Option(help: "Probes to send.") var count = 5
        @Option(help: "How long to wait for echoes after the last probe.") var timeout = "2s"
        @Option(help: "Time between probes.") var interval = "100ms"
        @Option(help: "text or json.") var output: OutputFormat = .text

        func run() throws {
            try reportingErrors(userError: badInput) {
                switch (listen, target) {
                case (let listen?, nil):
                    try UDPProbe.respond(
                        on: listen,
                        ready: {
                            print("answering UDP probes on \(listen)")
                            fflush(stdout)
                        })
                case (nil, let target?):
                    let result = try UDPProbe.probe(
                        target: target, count: count, timeout: try Durations.parse(timeout, what: "--timeout"),
                        interval: try Durations.parse(interval, what: "--interval"))
                    if output == .json {
                        try printJSON(result)
                    } else {
                        var line = "\(result.received)/\(result.sent) probes to \(target) came back"
                        if let min = result.rttMillisecondsMin, let avg = result.rttMillisecondsAvg,
                            let max = result.rttMillisecondsMax
                        {
                            line += String(format: ", rtt min/avg/max %.3f/%.3f/%.3f ms", min, avg, max)
                        }
                        print(line)
                    }
                    if !result.passes { throw ExitCode(1) }
                default:
                    throw PlanError("give exactly one of --listen ADDR:PORT or --target ADDR:PORT")
                }
            }
        }
    }
}
