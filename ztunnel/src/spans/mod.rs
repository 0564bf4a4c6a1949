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
use opentelemetry::trace::{
    SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceState, Tracer as _, TracerProvider as _,
};
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
        let propagator = TraceContextPropagator::new();
        let parent = propagator.extract(&opentelemetry_http::HeaderExtractor(headers));
        let cx = match &self.inner {
            Some((tracer, _)) => {
                let span = tracer
                    .span_builder(name.to_string())
                    .with_kind(kind)
                    .with_attributes(attrs)
                    .start_with_context(tracer, &parent);
                parent.with_span(span)
            }
            None => {
                // Not exported: a new span id under the caller's trace (or a new sampled trace,
                // so a tracer further along records it), as before tracing existed.
                let p = parent.span().span_context().clone();
                let (trace, flags, state) = if p.is_valid() {
                    (p.trace_id(), p.trace_flags(), p.trace_state().clone())
                } else {
                    (fastrand::u128(1..).into(), TraceFlags::SAMPLED, TraceState::default())
                };
                let sc = SpanContext::new(trace, fastrand::u64(1..).into(), flags, false, state);
                Context::new().with_remote_span_context(sc)
            }
        };
        propagator.inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
        Span { cx, exported: self.inner.is_some() }
    }

    /// Sends what is batched (tests, and shutdown).
    pub fn flush(&self) {
        if let Some((_, provider)) = &self.inner {
            let _ = provider.force_flush();
        }
    }
}

/// One started span; [`Span::finish`] ends it. Dropped unfinished, it ends as an error.
#[derive(Debug)]
pub struct Span {
    cx: Context,
    exported: bool,
}

impl Span {
    /// True when this span is exported, so attributes for [`Span::finish`] are worth building.
    pub fn exported(&self) -> bool {
        self.exported
    }

    /// The `traceparent` value this span hands on (its own ids).
    pub fn traceparent(&self) -> String {
        let sc = self.cx.span().span_context().clone();
        format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8())
    }

    /// Adds attributes known only at the end (status code, response flags, bytes).
    pub fn finish(self, attrs: Vec<KeyValue>, error: Option<String>) {
        if self.exported {
            let span = self.cx.span();
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
        if self.exported {
            self.cx.span().end();
        }
    }
}

#[cfg(test)]
mod tests;
