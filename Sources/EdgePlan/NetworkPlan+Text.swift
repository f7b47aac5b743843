import TunnelPKI

extension NetworkPlan {
    /// The plan as an operator reads it.
    public var text: String {
        var lines: [String] = []
        let i = input
        var facts = i.pools == nil ? "connectivity \(i.connectivity.rawValue), " : ""
        facts += "Kubernetes \(i.kubernetesVersion), "
        facts +=
            i.existingCluster
            ? "existing cluster (EIP: \(i.hasEIP.map { $0 ? "yes" : "no" } ?? "unknown"))" : "new cluster"
        facts += ", internet egress \(i.internetEgress ? "needed" : "not needed")"
        facts += ", public API server \(i.publicAPIServer ? "required" : "not required")"
        lines.append("EdgeTunnel network plan")
        lines.append("  \(facts)")
        if !i.edgeCIDRs.isEmpty && i.pools == nil {
            lines.append("  edge CIDRs: \(i.edgeCIDRs.map(\.description).joined(separator: ", "))")
        }
        lines.append("")
        func row(_ topic: String, _ verdict: String, _ reason: String) {
            lines.append(
                topic.padding(toLength: 16, withPad: " ", startingAt: 0)
                    + verdict.padding(toLength: 20, withPad: " ", startingAt: 0) + reason)
        }
        row("SNAT", snat.needed ? "needed" : "not needed", snat.reason)
        row("EIP", eip.needed ? "needed" : "not needed", eip.reason)
        row(
            "Tunnel Service", tunnelService.type,
            "\(tunnelService.namespace)/\(tunnelService.name): \(tunnelService.reason)")
        row("Private line", privateLine.path.rawValue, privateLine.reason)
        for (index, step) in privateLine.steps.enumerated() {
            lines.append(String(repeating: " ", count: 36) + "\(index + 1). \(step)")
        }
        if let lineService {
            row("Line Service", lineService.type, "\(lineService.namespace)/\(lineService.name): \(lineService.reason)")
        }
        func ruleLines(_ rules: [SecurityGroupRule], indent: String) {
            for rule in rules {
                lines.append(
                    "\(indent)\(rule.direction) \(rule.ipProtocol) \(rule.portRange) from \(rule.sourceCidrIp): \(rule.description)"
                )
                lines.append("\(indent)  \(rule.command)")
            }
        }
        if let pools {
            lines.append("")
            lines.append("Pools:")
            for pool in pools {
                let cidrs = pool.cidrs.isEmpty ? "no CIDR" : pool.cidrs.map(\.description).joined(separator: ", ")
                lines.append("  \(pool.name) (\(pool.connectivity.rawValue)): \(cidrs); nodes \(pool.selectorText)")
                let servers = pool.servers.map { "\($0.namespace)/\($0.service) (\($0.type), \($0.path))" }
                lines.append("    servers: \(servers.joined(separator: ", then "))")
                lines.append("    \(pool.reason)")
                if pool.securityGroupRules.isEmpty {
                    lines.append("    security group: no rules needed")
                } else {
                    lines.append("    security group rules:")
                    ruleLines(pool.securityGroupRules, indent: "      ")
                }
            }
        } else {
            lines.append("")
            if securityGroupRules.isEmpty {
                lines.append("Security group: no rules needed")
            } else {
                lines.append("Security group rules:")
                ruleLines(securityGroupRules, indent: "  ")
            }
        }
        if !findings.isEmpty {
            lines.append("")
            lines.append("Findings:")
            for finding in findings { lines.append("  \(finding.severity.rawValue): \(finding.message)") }
        }
        return lines.joined(separator: "\n")
    }
}
