//! Istio-compatible Prometheus metrics.
//!
//! Names and labels match what Istio's own ztunnel exports (`istio_tcp_*` with the standard
//! Istio label set), so existing Kiali graphs and Grafana dashboards work against this data
//! plane unchanged. Our own operational counters use the `ztunnel_` prefix. Values that are
//! only known at scrape time (eBPF map counters, connection-pool sizes) are added through
//! [`Metrics::add_collector`] and read on every scrape.
//!
//! The exposition format is OpenMetrics text (`# EOF` terminated), which Prometheus scrapes
//! natively; serve it with [`CONTENT_TYPE`].

use std::fmt;
use std::sync::{Mutex, MutexGuard};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

mod process;

/// The HTTP `Content-Type` matching [`Metrics::encode`]'s output, so scrapers pick the right
/// parser.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Istio's placeholder for a label whose value is not known (e.g. a non-mesh peer).
pub const UNKNOWN: &str = "unknown";

/// Which side of a connection reports a series; Istio dashboards filter on it to avoid
/// double counting a connection seen by both the client's and the server's proxy.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum Reporter {
    /// Reported by the proxy on the client's node (outbound).
    #[default]
    Source,
    /// Reported by the proxy on the server's node (inbound).
    Destination,
    /// Reported by a waypoint (L7 proxy), as Istio ambient labels its series.
    Waypoint,
}

impl Reporter {
    /// The label value Istio uses.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        }
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// The label set of Istio's `istio_tcp_*` series, one per (reporter, peers, service, policy).
///
/// Field names are the exact Istio label names. [`Default`] fills every workload/service field
/// with `"unknown"` (Istio's value for an unknown peer), `request_protocol="tcp"`,
/// `response_flags="-"` and `connection_security_policy="unknown"`; set
/// `connection_security_policy` to `"mutual_tls"` for HBONE/mTLS connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// Which proxy reports this series.
    pub reporter: Reporter,
    /// Client workload name (e.g. Deployment name).
    pub source_workload: String,
    /// Client `service.istio.io/canonical-name` (or `app` label).
    pub source_canonical_service: String,
    /// Client `service.istio.io/canonical-revision` (or `version` label).
    pub source_canonical_revision: String,
    /// Client namespace.
    pub source_workload_namespace: String,
    /// Client SPIFFE identity as proven by mTLS.
    pub source_principal: String,
    /// Client `app` label.
    pub source_app: String,
    /// Client `version` label.
    pub source_version: String,
    /// Cluster id of the client workload.
    pub source_cluster: String,
    /// Server workload name.
    pub destination_workload: String,
    /// Server canonical service name.
    pub destination_canonical_service: String,
    /// Server canonical revision.
    pub destination_canonical_revision: String,
    /// Server namespace.
    pub destination_workload_namespace: String,
    /// Server SPIFFE identity.
    pub destination_principal: String,
    /// Server `app` label.
    pub destination_app: String,
    /// Server `version` label.
    pub destination_version: String,
    /// Cluster id of the server workload.
    pub destination_cluster: String,
    /// Service hostname the client addressed (e.g. `reviews.default.svc.cluster.local`).
    pub destination_service: String,
    /// Namespace of that service.
    pub destination_service_namespace: String,
    /// Short name of that service.
    pub destination_service_name: String,
    /// `"tcp"` for L4 connections.
    pub request_protocol: String,
    /// `"-"`, or Envoy-style flags such as `"DENY"` / `"CONNECT"` on failure.
    pub response_flags: String,
    /// `"mutual_tls"` for mTLS/HBONE, else `"unknown"`.
    pub connection_security_policy: String,
}

impl Default for ConnectionLabels {
    fn default() -> Self {
        let u = || UNKNOWN.to_string();
        ConnectionLabels {
            reporter: Reporter::Source,
            source_workload: u(),
            source_canonical_service: u(),
            source_canonical_revision: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            source_cluster: u(),
            destination_workload: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_cluster: u(),
            destination_service: u(),
            destination_service_namespace: u(),
            destination_service_name: u(),
            request_protocol: "tcp".to_string(),
            response_flags: "-".to_string(),
            connection_security_policy: u(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
    limit: String,
}

/// A scrape-time reader for [`Metrics::add_collector`]: returns `(labels, value)` per series.
pub type CollectFn = Box<dyn Fn() -> Vec<(Vec<(String, String)>, u64)> + Send + Sync>;

/// A counter family whose series are produced by a closure on every scrape.
struct FnCollector {
    /// Family name without the `_total` suffix (the encoder appends it to counter samples).
    name: String,
    help: String,
    /// A gauge family (exact name) rather than a counter (`_total`).
    gauge: bool,
    f: CollectFn,
}

impl fmt::Debug for FnCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnCollector").field("name", &self.name).finish()
    }
}

impl Collector for FnCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let series = (self.f)();
        let kind = if self.gauge { MetricType::Gauge } else { MetricType::Counter };
        let mut family = encoder.encode_descriptor(&self.name, &self.help, None, kind)?;
        let gauge = self.gauge;
        for (labels, value) in series {
            if labels.is_empty() {
                // Unlabelled series: `name_total 4`, not `name_total{} 4`.
                if gauge {
                    family.encode_gauge(&(value as i64))?;
                } else {
                    family.encode_counter::<NoLabelSet, u64, u64>(&value, None)?;
                }
                continue;
            }
            let labels: Vec<(String, String)> = labels.into_iter().map(|(k, v)| (sanitize_name(&k), v)).collect();
            let series = family.encode_family(&labels)?;
            if gauge {
                ConstGauge::new(value as i64).encode(series)?;
            } else {
                ConstCounter::new(value).encode(series)?;
            }
        }
        Ok(())
    }
}

/// Replaces characters that are not valid in a metric or label name with `_`, so a caller's
/// typo cannot corrupt the whole exposition.
fn sanitize_name(name: &str) -> String {
    let mut out: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == ':' { c } else { '_' }).collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// The closed / sent / received series of one open connection (see
/// [`Metrics::open_connection`]).
#[derive(Debug, Clone)]
pub struct ConnectionCounters {
    closed: Counter,
    sent: Counter,
    received: Counter,
}

impl ConnectionCounters {
    /// Adds bytes of the still-open connection, so long-lived connections show traffic
    /// before they close. Bytes added here must not be passed again to [`Self::close`].
    /// `sent` is bytes sent towards the client (response direction), `received` bytes
    /// received from it, as in Istio.
    pub fn transferred(&self, sent: u64, received: u64) {
        if sent > 0 {
            self.sent.inc_by(sent);
        }
        if received > 0 {
            self.received.inc_by(received);
        }
    }

    /// Counts the connection closed and adds its (remaining) byte counts.
    pub fn close(&self, sent: u64, received: u64) {
        self.transferred(sent, received);
        self.closed.inc();
    }
}

/// All metrics of one ztunnel process; shared as `Arc<Metrics>` between the data path
/// (which increments) and the admin thread (which encodes on scrape).
pub struct Metrics {
    registry: Mutex<Registry>,
    connections_opened: Family<ConnectionLabels, Counter>,
    connections_closed: Family<ConnectionLabels, Counter>,
    connections_failed: Family<ConnectionLabels, Counter>,
    sent_bytes: Family<ConnectionLabels, Counter>,
    received_bytes: Family<ConnectionLabels, Counter>,
    tls_handshake_failures: Family<ReasonLabel, Counter>,
    authorization_denied: Family<DirectionLabel, Counter>,
    config_rejected: Family<KindLabel, Counter>,
    enrollment_rejected: Counter,
    original_destination_missing: Counter,
    connections_limited: Family<ListenerLabel, Counter>,
    source_not_kept: Counter,
    same_node_connections: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Creates and registers every built-in family. A labelled family shows up in a scrape once
    /// it has its first series; `ztunnel_enrollment_rejected_total` is always present.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        // prometheus-client appends `_total` to counter samples, so the names are registered
        // without it; the exposition shows the exact Istio names.
        registry.register_collector(Box::new(process::ProcessCollector));
        let connections_opened = Family::default();
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            connections_opened.clone(),
        );
        let connections_closed = Family::default();
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            connections_closed.clone(),
        );
        let connections_failed = Family::default();
        registry.register(
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed (denied by policy, upstream unreachable)",
            connections_failed.clone(),
        );
        let sent_bytes = Family::default();
        registry.register(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            sent_bytes.clone(),
        );
        let received_bytes = Family::default();
        registry.register(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            received_bytes.clone(),
        );
        let tls_handshake_failures = Family::default();
        registry.register(
            "ztunnel_tls_handshake_failures",
            "The total number of failed TLS handshakes, by reason",
            tls_handshake_failures.clone(),
        );
        let authorization_denied = Family::default();
        registry.register(
            "ztunnel_authorization_denied",
            "The total number of connections denied by authorization policy, by direction",
            authorization_denied.clone(),
        );
        let config_rejected = Family::default();
        registry.register(
            "ztunnel_config_rejected",
            "The total number of configuration resources rejected as invalid, by kind",
            config_rejected.clone(),
        );
        let enrollment_rejected = Counter::default();
        registry.register(
            "ztunnel_enrollment_rejected",
            "The total number of rejected workload enrollment requests",
            enrollment_rejected.clone(),
        );
        let original_destination_missing = Counter::default();
        registry.register(
            "ztunnel_original_destination_missing",
            "Connections on the outbound listener closed because the kernel had no original destination for them",
            original_destination_missing.clone(),
        );
        let source_not_kept = Counter::default();
        registry.register(
            "ztunnel_inbound_source_not_kept",
            "Connections to an app dialled from the proxy's own address because the kernel refused the client's (transparent bind or reply routing)",
            source_not_kept.clone(),
        );
        let same_node_connections = Counter::default();
        registry.register(
            "ztunnel_same_node_connections",
            "Connections between two pods of this agent carried inside the process (the same-node fast path) instead of HBONE",
            same_node_connections.clone(),
        );
        let connections_limited = Family::default();
        registry.register(
            "ztunnel_connections_limited",
            "The total number of connections reset because a pod listener was at its connection cap, by listener",
            connections_limited.clone(),
        );
        Metrics {
            source_not_kept,
            same_node_connections,
            connections_limited,
            original_destination_missing,
            registry: Mutex::new(registry),
            connections_opened,
            connections_closed,
            connections_failed,
            sent_bytes,
            received_bytes,
            tls_handshake_failures,
            authorization_denied,
            config_rejected,
            enrollment_rejected,
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while encoding leaves the registry itself intact; keep serving.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a connection refused after it was accepted, as Istio's ztunnel does: opened
    /// with `response_flags="-"`, then closed and failed with `flag` (e.g. `DENY`, `CONNECT`).
    pub fn connection_failed(&self, labels: &ConnectionLabels, flag: &str) {
        self.connections_opened.get_or_create(labels).inc();
        let mut failed = labels.clone();
        failed.response_flags = flag.to_string();
        self.connections_closed.get_or_create(&failed).inc();
        self.connections_failed.get_or_create(&failed).inc();
    }

    /// Counts an outbound connection closed for lack of an original destination.
    pub fn original_destination_missing(&self) {
        self.original_destination_missing.inc();
    }

    /// Counts a connection carried by the same-node fast path.
    pub fn same_node_connection(&self) {
        self.same_node_connections.inc();
    }

    /// Counts a connection reset at a pod listener's cap (`ztunnel_connections_limited_total`).
    /// `limit` says which cap was hit: `pod` (the listener's) or `peer` (one address's share).
    pub fn connection_limited(&self, listener: &str, limit: &str) {
        self.connections_limited
            .get_or_create(&ListenerLabel { listener: listener.to_string(), limit: limit.to_string() })
            .inc();
    }

    /// Counts a newly established connection and returns the handles of its other series,
    /// so an open connection holds three counter pointers instead of its ~25 label strings.
    pub fn open_connection(&self, labels: &ConnectionLabels) -> ConnectionCounters {
        self.connections_opened.get_or_create(labels).inc();
        ConnectionCounters {
            closed: self.connections_closed.get_or_create(labels).clone(),
            sent: self.sent_bytes.get_or_create(labels).clone(),
            received: self.received_bytes.get_or_create(labels).clone(),
        }
    }

    /// Counts a failed TLS handshake (`ztunnel_tls_handshake_failures_total{reason}`); keep
    /// `reason` to a small fixed set to bound cardinality.
    pub fn tls_handshake_failed(&self, reason: &str) {
        self.tls_handshake_failures.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
    }

    /// Counts a connection denied by policy (`ztunnel_authorization_denied_total{direction}`),
    /// `direction` being e.g. `"inbound"` or `"outbound"`.
    pub fn policy_denied(&self, direction: &str) {
        self.authorization_denied.get_or_create(&DirectionLabel { direction: direction.to_string() }).inc();
    }

    /// Counts a configuration resource rejected as invalid (`ztunnel_config_rejected_total{kind}`).
    pub fn config_rejected(&self, kind: &str) {
        self.config_rejected.get_or_create(&KindLabel { kind: kind.to_string() }).inc();
    }

    /// Counts an app connection that could not keep the client's address
    /// (`ztunnel_inbound_source_not_kept_total`).
    pub fn source_not_kept(&self) {
        self.source_not_kept.inc();
    }

    /// Counts a rejected enrollment request (`ztunnel_enrollment_rejected_total`).
    pub fn enrollment_rejected(&self) {
        self.enrollment_rejected.inc();
    }

    /// Registers a counter family whose series are read by `f` on every scrape, for values that
    /// live elsewhere (eBPF maps, connection pools). `name` may be given with or without the
    /// `_total` suffix; the samples are always exposed as `<name>_total`. Invalid characters in
    /// the name or label names become `_`. `f` runs on the admin thread while the registry is
    /// locked, so it must be quick and must not call back into these `Metrics`' `encode` or
    /// `add_collector`. Each label set it returns should be unique.
    pub fn add_collector(&self, name: &str, help: &str, f: CollectFn) {
        let name = sanitize_name(name.strip_suffix("_total").unwrap_or(name));
        self.add_fn(name, help, false, f);
    }

    /// Like [`Self::add_collector`], for values that go up and down or are points in time
    /// (readiness, certificate expiry): the family is a gauge, named exactly `name`.
    pub fn add_gauge_collector(&self, name: &str, help: &str, f: CollectFn) {
        self.add_fn(sanitize_name(name), help, true, f);
    }

    fn add_fn(&self, name: String, help: &str, gauge: bool, f: CollectFn) {
        let mut help = help.trim().replace('\\', "\\\\").replace('\n', " ");
        if !help.ends_with('.') {
            help.push('.'); // as prometheus-client does for registered metrics
        }
        self.registry().register_collector(Box::new(FnCollector { name, help, gauge, f }));
    }

    /// Registers a metric family of another component (the waypoint's request metrics) so
    /// it is served on the same `/metrics`. Counters are named without `_total`.
    pub fn register(&self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        self.registry().register(name, help, metric);
    }

    /// Renders every metric in OpenMetrics text format (ending in `# EOF`), for `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "encoding metrics failed; returning a partial scrape");
        }
        out
    }
}

#[cfg(test)]
mod tests;
