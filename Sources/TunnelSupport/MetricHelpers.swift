import NIOConcurrencyHelpers
import Prometheus

extension MetricNameDescriptor {
    /// A metric whose name is spelled in full (`edge_tunnel_server_agents`): nothing is prefixed or suffixed.
    public static func named(_ name: String, help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }
}

/// Counters of one metric name split by one label, each created when its label value is first seen
/// (e.g. `edge_tunnel_server_dial_failures_total{reason}`). Thread-safe.
public final class LabeledCounters: @unchecked Sendable {
    private let registry: PrometheusCollectorRegistry
    private let name: String
    private let label: String
    private let help: String
    private let lock = NIOLock()
    private var counters: [String: Counter] = [:]

    public init(registry: PrometheusCollectorRegistry, name: String, label: String, help: String) {
        self.registry = registry
        self.name = name
        self.label = label
        self.help = help
    }

    public func increment(_ value: String) {
        let counter = lock.withLock {
            if let counter = counters[value] { return counter }
            let counter = registry.makeCounter(descriptor: .named(name, help: help), labels: [(label, value)])
            counters[value] = counter
            return counter
        }
        counter.increment()
    }
}

/// Feeds a Prometheus counter from a running total that is only read at scrape time (bytes moved by live
/// and past connections), so the counter never goes backwards. Thread-safe.
public final class TotalCounter: @unchecked Sendable {
    private let counter: Counter
    private let lock = NIOLock()
    private var reported = 0

    public init(_ counter: Counter) { self.counter = counter }

    public func update(to total: Int) {
        lock.withLock {
            guard total > reported else { return }
            counter.increment(by: Int64(total - reported))
            reported = total
        }
    }
}
