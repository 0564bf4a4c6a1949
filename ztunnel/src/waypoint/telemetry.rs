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
use std::sync::Arc;

use super::access_log::{AccessLogger, Record};
use crate::metrics::{ConnectionLabels, Metrics};
use crate::spans::Span;

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

    /// Records a finished request.
    pub fn record(&self, labels: &RequestLabels, took: Duration, request_bytes: u64, response_bytes: u64) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(took.as_secs_f64() * 1000.0);
        self.request_bytes.get_or_create(labels).observe(request_bytes as f64);
        self.response_bytes.get_or_create(labels).observe(response_bytes as f64);
    }
}

/// The `grpc_response_status` label: a status code 0–16, `other` for anything else an
/// upstream sends (label values must not be chosen by an upstream), `-` when absent.
pub fn grpc_status_label(v: Option<&str>) -> String {
    match v {
        None => "-".into(),
        Some(s) if s.parse::<u8>().is_ok_and(|c| c <= 16) => s.to_string(),
        Some(_) => "other".into(),
    }
}

/// Writes one request's metrics and access-log line once, when its response ends (or is
/// dropped unfinished: the client went away).
pub struct Recorder {
    metrics: RequestMetrics,
    labels: RequestLabels,
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
    /// A recorder for a request whose response head has these `labels`.
    pub fn new(
        metrics: RequestMetrics,
        labels: RequestLabels,
        (log, logger): (Record, Arc<AccessLogger>),
        started: Instant,
        request_bytes: u64,
        span: Span,
    ) -> Self {
        Recorder {
            metrics,
            labels,
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
        self.metrics.record(&self.labels, took, self.request_bytes, self.response_bytes);
        self.log.bytes_sent = self.response_bytes;
        self.log.duration_ms = took.as_millis() as u64;
        self.logger.emit(&self.log);
        if let Some(span) = self.span.take() {
            let code = self.log.response_code;
            let attrs = vec![
                KeyValue::new("http.response.status_code", code as i64),
                KeyValue::new("istio.response_flags", self.log.response_flags.clone()),
                KeyValue::new("upstream.address", self.log.upstream_host.clone()),
                KeyValue::new("upstream.cluster", self.log.upstream_cluster.clone()),
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
                    this.recorder.labels.grpc_response_status = status.to_string();
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
