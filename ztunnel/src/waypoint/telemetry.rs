//! Per-request telemetry of the waypoint, with Istio's names and labels so dashboards and
//! Kiali read it unchanged: `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes` and `istio_response_bytes` (reporter `waypoint`), Envoy-style
//! `response_flags` (`FI` injected abort, `DI` injected delay, `UT` timeout, `URX` retries
//! exhausted, `UH` no endpoint, `UF` upstream connect failure), a retry counter, and one
//! access-log line per request.
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use opentelemetry::KeyValue;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::{Arc, Mutex};

use super::access_log::{dash, AccessLogger, Record};
use crate::metrics::{ConnectionLabels, Metrics, Reporter};
use crate::proxy::relay::workload_labels;
use crate::spans::Span;
use crate::state::{Service, Workload};

/// `istio_requests_total` and friends: the connection label set plus the status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub common: ConnectionLabels,
    /// HTTP status sent to the client.
    pub response_code: String,
    /// gRPC status, for gRPC requests (`-` otherwise).
    pub grpc_response_status: String,
}

/// The service label of the retry counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub destination_service: String,
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The waypoint's request metrics, registered on the process's [`Metrics`].
#[derive(Clone)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
    retries: Family<ServiceLabel, Counter>,
}

fn duration_buckets() -> Histogram {
    // Istio's buckets for istio_request_duration_milliseconds.
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
    ])
}

fn size_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0, 10.0, 9))
}

impl RequestMetrics {
    /// Creates the families and registers them on `metrics`.
    pub fn register(metrics: &Metrics) -> Self {
        let m = RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_buckets),
            request_bytes: Family::new_with_constructor(size_buckets),
            response_bytes: Family::new_with_constructor(size_buckets),
            retries: Family::default(),
        };
        metrics.register("istio_requests", "Total number of requests", m.requests.clone());
        metrics.register("istio_request_duration_milliseconds", "Request duration", m.duration.clone());
        metrics.register("istio_request_bytes", "Request sizes", m.request_bytes.clone());
        metrics.register("istio_response_bytes", "Response sizes", m.response_bytes.clone());
        metrics.register(
            "ztunnel_waypoint_retries",
            "Requests the waypoint sent again after a retriable failure",
            m.retries.clone(),
        );
        m
    }

    /// Counts one retry toward `service`.
    pub fn retried(&self, service: &str) {
        self.retries.get_or_create(&ServiceLabel { destination_service: service.to_string() }).inc();
    }

    /// The four series of one label set, looked up once (by hashing every label) and then
    /// kept by the tunnel that uses them.
    pub fn series(&self, labels: &RequestLabels) -> Series {
        Series {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    /// Records a finished request.
    pub fn record(&self, labels: &RequestLabels, took: Duration, request_bytes: u64, response_bytes: u64) {
        self.series(labels).record(took, request_bytes, response_bytes);
    }
}

/// Handles on one label set's request series (they share the family's storage).
#[derive(Clone)]
pub struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Series {
    /// Counts one finished request.
    pub fn record(&self, took: Duration, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration.observe(took.as_secs_f64() * 1000.0);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

/// A response's gRPC status as a label value: a code 0–16, anything else an upstream sends
/// is `other` (label values must not be chosen by an upstream), absent is `-`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcStatus {
    Absent,
    Code(u8),
    Other,
}

impl GrpcStatus {
    /// From a `grpc-status` header or trailer value.
    pub fn of(v: Option<&str>) -> Self {
        match v {
            None => GrpcStatus::Absent,
            Some(s) => match s.parse::<u8>() {
                Ok(c) if c <= 16 => GrpcStatus::Code(c),
                _ => GrpcStatus::Other,
            },
        }
    }

    /// The `grpc_response_status` label.
    pub fn label(self) -> String {
        match self {
            GrpcStatus::Absent => "-".into(),
            GrpcStatus::Code(c) => c.to_string(),
            GrpcStatus::Other => "other".into(),
        }
    }
}

/// Everything a request's labels are made from beyond its tunnel. The workloads and service
/// are compared by identity: a state update brings new `Arc`s, so a key made before it never
/// matches one made after, and the labels follow the update.
#[derive(Clone)]
pub struct SeriesKey {
    pub src: Option<Arc<Workload>>,
    pub dst: Option<Arc<Workload>>,
    pub service: Option<Arc<Service>>,
    pub grpc: bool,
    pub flags: Vec<&'static str>,
    pub code: u16,
    pub grpc_status: GrpcStatus,
}

fn same<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl SeriesKey {
    fn matches(&self, o: &SeriesKey) -> bool {
        self.code == o.code
            && self.grpc == o.grpc
            && self.grpc_status == o.grpc_status
            && self.flags == o.flags
            && same(&self.dst, &o.dst)
            && same(&self.src, &o.src)
            && same(&self.service, &o.service)
    }
}

/// Label sets a tunnel keeps at hand.
const TUNNEL_SERIES: usize = 16;

/// What all requests of one tunnel share in their labels, and the series its recent
/// requests used. Building Istio's 25 labels and hashing them into four families was a
/// fifth of the waypoint's allocations per request; a keep-alive connection's requests
/// mostly land on a few label sets, found here by comparing pointers.
pub struct TunnelSeries {
    reporter: Reporter,
    source_principal: String,
    /// At an ingress the gateway stands in for the source, `(namespace, name)`.
    source_gateway: Option<(String, String)>,
    trust_domain: String,
    recent: Mutex<Vec<(SeriesKey, Series)>>,
}

impl TunnelSeries {
    /// A mesh tunnel from `peer` (reporter `waypoint`).
    pub fn mesh(peer: &crate::identity::Identity, trust_domain: &str) -> Self {
        Self::new(Reporter::Waypoint, peer.to_string(), None, trust_domain)
    }

    /// An ingress connection: the gateway `(namespace, name)` with its own identity is the
    /// source, as Istio's gateway reports (reporter `source`).
    pub fn ingress(gateway: (String, String), identity: &crate::identity::Identity, trust_domain: &str) -> Self {
        Self::new(Reporter::Source, identity.to_string(), Some(gateway), trust_domain)
    }

    fn new(reporter: Reporter, principal: String, gateway: Option<(String, String)>, trust_domain: &str) -> Self {
        TunnelSeries {
            reporter,
            source_principal: principal,
            source_gateway: gateway,
            trust_domain: trust_domain.to_string(),
            recent: Mutex::new(Vec::new()),
        }
    }

    /// Istio's labels for a request of this tunnel.
    pub fn labels(&self, k: &SeriesKey) -> RequestLabels {
        let mut l = workload_labels(self.reporter, k.src.as_deref(), k.dst.as_deref(), k.service.as_deref());
        l.source_principal = self.source_principal.clone();
        if let Some((ns, name)) = &self.source_gateway {
            l.source_workload = name.clone();
            l.source_workload_namespace = ns.clone();
            l.source_canonical_service = name.clone();
        }
        if let Some(w) = &k.dst {
            l.destination_principal =
                format!("spiffe://{}/ns/{}/sa/{}", self.trust_domain, w.namespace, w.service_account);
        }
        l.request_protocol = if k.grpc { "grpc" } else { "http" }.into();
        l.response_flags = if k.flags.is_empty() { "-".into() } else { k.flags.join(",") };
        l.connection_security_policy = "mutual_tls".into();
        RequestLabels { common: l, response_code: k.code.to_string(), grpc_response_status: k.grpc_status.label() }
    }

    /// The series for `key`: a recent one, else looked up in `metrics` and kept (the oldest
    /// of [`TUNNEL_SERIES`] makes room).
    pub fn series(&self, key: &SeriesKey, metrics: &RequestMetrics) -> Series {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = recent.iter().find(|(k, _)| k.matches(key)) {
            return s.clone();
        }
        let s = metrics.series(&self.labels(key));
        if recent.len() >= TUNNEL_SERIES {
            recent.remove(0);
        }
        recent.push((key.clone(), s.clone()));
        s
    }
}

/// Writes one request's metrics and access-log line once, when its response ends (or is
/// dropped unfinished: the client went away).
pub struct Recorder {
    metrics: RequestMetrics,
    tunnel: Arc<TunnelSeries>,
    key: SeriesKey,
    log: Record,
    logger: Arc<AccessLogger>,
    started: Instant,
    request_bytes: u64,
    response_bytes: u64,
    done: bool,
    /// The request's server span, ended with the response.
    span: Option<Span>,
}

impl Recorder {
    /// A recorder for a request of `tunnel` whose response head gives `key`.
    pub fn new(
        (metrics, tunnel, key): (RequestMetrics, Arc<TunnelSeries>, SeriesKey),
        (log, logger): (Record, Arc<AccessLogger>),
        started: Instant,
        request_bytes: u64,
        span: Span,
    ) -> Self {
        Recorder {
            metrics,
            tunnel,
            key,
            log,
            logger,
            started,
            request_bytes,
            response_bytes: 0,
            done: false,
            span: Some(span),
        }
    }

    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let took = self.started.elapsed();
        self.tunnel.series(&self.key, &self.metrics).record(took, self.request_bytes, self.response_bytes);
        self.log.bytes_sent = self.response_bytes;
        self.log.duration_ms = took.as_millis() as u64;
        self.logger.emit(&self.log);
        if let Some(span) = self.span.take().filter(Span::exported) {
            let code = self.log.response_code;
            let attrs = vec![
                KeyValue::new("http.response.status_code", code as i64),
                KeyValue::new("istio.response_flags", dash(&self.log.response_flags).to_string()),
                KeyValue::new("upstream.address", dash(&self.log.upstream_host).to_string()),
                KeyValue::new("upstream.cluster", dash(&self.log.upstream_cluster).to_string()),
                KeyValue::new("http.request.body.size", self.request_bytes as i64),
                KeyValue::new("http.response.body.size", self.response_bytes as i64),
            ];
            span.finish(attrs, (code >= 500).then(|| format!("HTTP {code}")));
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish();
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts its bytes, reads `grpc-status` from its trailers and
    /// records the request when it ends.
    pub struct Observed<B> {
        #[pin]
        inner: B,
        recorder: Recorder,
    }
}

impl<B> Observed<B> {
    /// Observes `inner` for `recorder`.
    pub fn new(inner: B, recorder: Recorder) -> Self {
        Observed { inner, recorder }
    }
}

impl<B: Body<Data = Bytes>> Body for Observed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.recorder.response_bytes += d.len() as u64;
                }
                if let Some(status) =
                    frame.trailers_ref().and_then(|t| t.get("grpc-status")).and_then(|v| v.to_str().ok())
                {
                    this.recorder.key.grpc_status = GrpcStatus::of(Some(status));
                }
            }
            Poll::Ready(None) => this.recorder.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn workload(name: &str, version: &str) -> Arc<Workload> {
        Arc::new(
            serde_yaml_ng::from_str(&format!(
                "uid: {name}\nname: {name}\nnamespace: default\nserviceAccount: bookinfo-{name}\ncanonicalName: {name}\ncanonicalRevision: {version}\n"
            ))
            .unwrap(),
        )
    }

    fn key(dst: &Arc<Workload>, code: u16) -> SeriesKey {
        SeriesKey {
            src: None,
            dst: Some(dst.clone()),
            service: None,
            grpc: false,
            flags: Vec::new(),
            code,
            grpc_status: GrpcStatus::Absent,
        }
    }

    fn count(exposition: &str, needles: &[&str]) -> f64 {
        exposition
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{") && needles.iter().all(|n| l.contains(n)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }

    fn setup() -> (Metrics, RequestMetrics, TunnelSeries) {
        let metrics = Metrics::new();
        let requests = RequestMetrics::register(&metrics);
        let peer = Identity::new("cluster.local", "default", "sleep").unwrap();
        (metrics, requests, TunnelSeries::mesh(&peer, "cluster.local"))
    }

    #[test]
    fn a_tunnels_requests_with_the_same_outcome_count_in_one_series() {
        let (metrics, requests, tunnel) = setup();
        let v1 = workload("reviews-v1", "v1");
        for _ in 0..3 {
            tunnel.series(&key(&v1, 200), &requests).record(Duration::from_millis(1), 0, 10);
        }
        tunnel.series(&key(&v1, 503), &requests).record(Duration::from_millis(1), 0, 10);
        let text = metrics.encode();
        assert_eq!(count(&text, &["response_code=\"200\"", "destination_version=\"v1\""]), 3.0, "{text}");
        assert_eq!(count(&text, &["response_code=\"503\""]), 1.0, "{text}");
        assert_eq!(count(&text, &["source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\""]), 4.0);
        assert_eq!(
            count(&text, &["destination_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-reviews-v1\""]),
            4.0
        );
    }

    #[test]
    fn a_workload_changed_by_a_state_update_gets_its_new_labels() {
        let (metrics, requests, tunnel) = setup();
        let before = workload("reviews-v1", "v1");
        tunnel.series(&key(&before, 200), &requests).record(Duration::from_millis(1), 0, 10);
        // Same uid, new object: what a state update hands the request path.
        let after = workload("reviews-v1", "v1-canary");
        tunnel.series(&key(&after, 200), &requests).record(Duration::from_millis(1), 0, 10);
        let text = metrics.encode();
        assert_eq!(count(&text, &["destination_version=\"v1\""]), 1.0, "{text}");
        assert_eq!(count(&text, &["destination_version=\"v1-canary\""]), 1.0, "{text}");
    }

    #[test]
    fn more_label_sets_than_a_tunnel_keeps_still_count_right() {
        let (metrics, requests, tunnel) = setup();
        let v1 = workload("reviews-v1", "v1");
        let codes: Vec<u16> = (0..TUNNEL_SERIES as u16 + 4).map(|i| 200 + i).collect();
        for round in 0..2 {
            for c in &codes {
                tunnel.series(&key(&v1, *c), &requests).record(Duration::from_millis(round), 0, 1);
            }
        }
        let text = metrics.encode();
        for c in &codes {
            assert_eq!(count(&text, &[&format!("response_code=\"{c}\"")]), 2.0, "{c}: {text}");
        }
    }

    #[test]
    fn grpc_status_labels_are_codes_0_to_16_or_other() {
        assert_eq!(GrpcStatus::of(None).label(), "-");
        assert_eq!(GrpcStatus::of(Some("14")).label(), "14");
        assert_eq!(GrpcStatus::of(Some("17")).label(), "other");
        assert_eq!(GrpcStatus::of(Some("evil\"} 1")).label(), "other");
    }
}
