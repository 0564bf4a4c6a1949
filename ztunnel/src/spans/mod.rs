//! Distributed traces: a span per request in the waypoint (and, opt-in, per connection in the
//! node agent), parented on the caller's W3C `traceparent` and exported over OTLP/HTTP.
//!
//! Tracing is configured once per process as a value ([`TraceConfig`]) and handed down; the
//! proxies only see a [`Tracer`], which is a no-op when tracing is off. Off or not sampled, a
//! request still gets a fresh span id in the `traceparent` it carries onward, so the trace
//! chain stays intact for a tracer further along; only the export is skipped.
//!
//! Spans are batched by the OpenTelemetry SDK on its own thread and posted by [`http_client`]
//! from a dedicated single-thread runtime: exporting never runs on the data path.
mod http_client;

use std::time::Duration;

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, TraceState, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

/// Where and how much to trace; built from flags at the binary's edge.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// OTLP/HTTP traces endpoint, e.g. `http://collector:4318/v1/traces`.
    pub endpoint: String,
    /// `service.name` of the exported spans (e.g. `waypoint.default`, `ztunnel`).
    pub service_name: String,
    /// Share of new traces (no sampled parent) that are recorded, 0.0 to 1.0. A request that
    /// arrives with a `traceparent` follows its sampled flag, as Envoy does.
    pub sampling: f64,
    /// How long spans wait in the batch before they are posted.
    pub export_delay: Duration,
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("cannot start the trace export thread: {0}")]
    Thread(std::io::Error),
    #[error("sampling must be between 0 and 1, got {0}")]
    Sampling(f64),
}

/// Starts spans; a no-op exporter when built with [`Tracer::disabled`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Tracer {
    inner: Option<(SdkTracer, SdkTracerProvider)>,
}

impl Tracer {
    /// No export: requests still get a new span id in their `traceparent`.
    pub fn disabled() -> Self {
        Tracer { inner: None }
    }

    /// Exports to `cfg.endpoint`. The endpoint is checked here; a collector that is down later
    /// only loses spans (logged by the SDK), never requests.
    pub fn otlp(cfg: &TraceConfig) -> Result<Self, TraceError> {
        if !(0.0..=1.0).contains(&cfg.sampling) {
            return Err(TraceError::Sampling(cfg.sampling));
        }
        let uri: http::Uri = cfg.endpoint.parse().map_err(|e: http::uri::InvalidUri| TraceError::Endpoint {
            endpoint: cfg.endpoint.clone(),
            reason: e.to_string(),
        })?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(TraceError::Endpoint {
                endpoint: cfg.endpoint.clone(),
                reason: "an http:// URL with a host is required (OTLP/HTTP, protobuf)".into(),
            });
        }
        let client = http_client::ExportClient::start().map_err(TraceError::Thread)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(cfg.endpoint.clone())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| TraceError::Endpoint { endpoint: cfg.endpoint.clone(), reason: e.to_string() })?;
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(BatchConfigBuilder::default().with_scheduled_delay(cfg.export_delay).build())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sampling))))
            .with_resource(Resource::builder().with_service_name(cfg.service_name.clone()).build())
            .build();
        let tracer = provider.tracer("ztunnel");
        Ok(Tracer { inner: Some((tracer, provider)) })
    }

    /// True when spans are exported.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Starts a span named `name` as a child of the `traceparent` in `headers` (or a new
    /// trace), and rewrites `headers`' `traceparent` to this span, so whatever is called next
    /// sees it as its parent. `tracestate` is kept.
    pub fn start(&self, name: &str, kind: SpanKind, headers: &mut HeaderMap, attrs: Vec<KeyValue>) -> Span {
        let Some((tracer, _)) = &self.inner else {
            return local_span(headers);
        };
        let propagator = TraceContextPropagator::new();
        let parent = propagator.extract(&opentelemetry_http::HeaderExtractor(headers));
        let span = tracer
            .span_builder(name.to_string())
            .with_kind(kind)
            .with_attributes(attrs)
            .start_with_context(tracer, &parent);
        let cx = parent.with_span(span);
        propagator.inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
        let sc = cx.span().span_context().clone();
        let ids = Ids {
            trace: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span: u64::from_be_bytes(sc.span_id().to_bytes()),
            sampled: sc.is_sampled(),
        };
        Span { cx: Some(cx), ids }
    }

    /// Sends what is batched (tests, and shutdown).
    pub fn flush(&self) {
        if let Some((_, provider)) = &self.inner {
            let _ = provider.force_flush();
        }
    }
}

/// Not exported: a new span id under the caller's trace (or a new sampled trace, so a tracer
/// further along records it), with the caller's `tracestate`. This runs for every request
/// when tracing is off, so it reads and writes the two headers itself instead of building
/// OpenTelemetry contexts (a dozen allocations); [`parent`] reads them exactly as the SDK's
/// W3C propagator does (test `the_local_path_reads_traceparent_as_the_sdk_does`).
fn local_span(headers: &mut HeaderMap) -> Span {
    let (trace, sampled, state) = match parent(headers) {
        Some((trace, sampled)) => {
            // The SDK re-serializes a valid `tracestate` and writes an empty one for an
            // invalid or missing header; the same here, parsed only when one came.
            let state = headers
                .get(&TRACESTATE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.parse::<TraceState>().unwrap_or_default().header())
                .unwrap_or_default();
            (trace, sampled, state)
        }
        None => (fastrand::u128(1..), true, String::new()),
    };
    let ids = Ids { trace, span: fastrand::u64(1..), sampled };
    if let Ok(v) = http::HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(ids.traceparent_bytes())) {
        headers.insert(TRACEPARENT.clone(), v);
    }
    let state = if state.is_empty() { Ok(http::HeaderValue::from_static("")) } else { state.parse() };
    if let Ok(v) = state {
        headers.insert(TRACESTATE.clone(), v);
    }
    Span { cx: None, ids }
}

/// The W3C trace context headers, named once (a name that is not a standard header is
/// otherwise copied into a new allocation on every insert).
pub(crate) static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
pub(crate) static TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// Writes the low `out.len()` hex digits of `n` into `out`, lower case, most significant first:
/// ids for headers without a formatter's allocation.
pub(crate) fn lower_hex(n: u128, out: &mut [u8]) {
    let len = out.len();
    for (i, c) in out.iter_mut().enumerate() {
        *c = b"0123456789abcdef"[(n >> (4 * (len - 1 - i))) as usize & 0xf];
    }
}

/// The caller's trace id and sampled flag from `traceparent`, by the rules of the SDK's
/// `TraceContextPropagator` (version 0 has exactly four fields, up to 254 with more; lower
/// case hex; ids not zero; only the sampled flag is kept); `None` when it has none valid.
fn parent(headers: &HeaderMap) -> Option<(u128, bool)> {
    let v = headers.get(&TRACEPARENT).and_then(|v| v.to_str().ok())?.trim();
    let mut parts = v.split_terminator('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let version = u8::from_str_radix(version, 16).ok()?;
    let more = parts.next().is_some();
    if version == 255 || (version == 0 && more) {
        return None;
    }
    let lower = |s: &str| !s.bytes().any(|c| c.is_ascii_uppercase());
    if !lower(trace) || !lower(span) || !lower(flags) {
        return None;
    }
    let trace = u128::from_str_radix(trace, 16).ok()?;
    let span = u64::from_str_radix(span, 16).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    (trace != 0 && span != 0).then_some((trace, flags & 1 == 1))
}

/// A span's W3C ids.
#[derive(Debug, Clone, Copy)]
struct Ids {
    trace: u128,
    span: u64,
    sampled: bool,
}

impl Ids {
    /// `00-<trace>-<span>-<flags>`, 55 bytes.
    fn traceparent_bytes(&self) -> [u8; 55] {
        let mut b = *b"00-00000000000000000000000000000000-0000000000000000-00";
        lower_hex(self.trace, &mut b[3..35]);
        lower_hex(self.span.into(), &mut b[36..52]);
        b[54] = if self.sampled { b'1' } else { b'0' };
        b
    }
}

/// One started span; [`Span::finish`] ends it. Dropped unfinished, it ends as an error.
#[derive(Debug)]
pub struct Span {
    /// The exported span's context; `None` when not exported.
    cx: Option<Context>,
    ids: Ids,
}

impl Span {
    /// True when this span is exported, so attributes for [`Span::finish`] are worth building.
    pub fn exported(&self) -> bool {
        self.cx.is_some()
    }

    /// The `traceparent` value this span hands on (its own ids).
    pub fn traceparent(&self) -> String {
        String::from_utf8_lossy(&self.ids.traceparent_bytes()).into_owned()
    }

    /// Adds attributes known only at the end (status code, response flags, bytes).
    pub fn finish(self, attrs: Vec<KeyValue>, error: Option<String>) {
        if let Some(cx) = &self.cx {
            let span = cx.span();
            span.set_attributes(attrs);
            if let Some(e) = error {
                span.set_status(Status::error(e));
            }
            span.end();
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        // `finish` ends the span first; ending twice is a no-op in the SDK.
        if let Some(cx) = &self.cx {
            cx.span().end();
        }
    }
}

#[cfg(test)]
mod tests;
