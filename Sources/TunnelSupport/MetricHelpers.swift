import NIOConcurrencyHelpers
import Prometheus

extension MetricNameDescriptor {
    /// A metric whose name is spelled in full (`edge_tunnel_server_agents`): nothing is prefixed or suffixed.
    public static func named(_ name: String, help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }
}

/// Counters of one metric name split by labels, each created when its label values are first seen
/// (e.g. `edge_tunnel_server_dial_failures_total{reason}`). Thread-safe.
public final class LabeledCounters: @unchecked Sendable {
    private let registry: PrometheusCollectorRegistry
    private let name: String
    private let labels: [String]
    private let help: String
    private let lock = NIOLock()
    private var counters: [[String]: Counter] = [:]

    public convenience init(registry: PrometheusCollectorRegistry, name: String, label: String, help: String) {
        self.init(registry: registry, name: name, labels: [label], help: help)
    }

    public init(registry: PrometheusCollectorRegistry, name: String, labels: [String], help: String) {
        self.registry = registry
        self.name = name
        self.labels = labels
        self.help = help
    }

    /// Increments the counter of `values`, one for each label in order.
    public func increment(_ values: String...) {
        let counter = lock.withLock {
            if let counter = counters[values] { return counter }
            let counter = registry.makeCounter(descriptor: .named(name, help: help), labels: Array(zip(labels, values)))
            counters[values] = counter
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

/// Gauges of one metric name split by one label, each created when its label value is first seen. Thread-safe.
public final class LabeledGauges: @unchecked Sendable {
    private let registry: PrometheusCollectorRegistry
    private let name: String
    private let label: String
    private let help: String
    private let lock = NIOLock()
    private var gauges: [String: Gauge] = [:]

    public init(registry: PrometheusCollectorRegistry, name: String, label: String, help: String) {
        self.registry = registry
        self.name = name
        self.label = label
        self.help = help
    }

    public func set(_ value: String, _ number: Double) {
        let gauge = lock.withLock {
            if let gauge = gauges[value] { return gauge }
            let gauge = registry.makeGauge(descriptor: .named(name, help: help), labels: [(label, value)])
            gauges[value] = gauge
            return gauge
        }
        gauge.set(number)
    }
}
