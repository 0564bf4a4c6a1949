//! The trace chain through one hop: the caller's trace id kept, a new span id handed on,
//! the sampled flag followed, and bad exporter settings refused by name.
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::trace::SpanKind;

use super::*;

const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn headers(tp: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(tp) = tp {
        h.insert("traceparent", tp.parse().unwrap());
    }
    h
}

fn cfg(endpoint: &str) -> TraceConfig {
    TraceConfig {
        endpoint: endpoint.into(),
        service_name: "test".into(),
        sampling: 1.0,
        export_delay: Duration::from_millis(100),
    }
}

#[test]
fn disabled_tracer_keeps_the_trace_and_hands_on_a_new_span() {
    let mut h = headers(Some(PARENT));
    let span = Tracer::disabled().start("x", SpanKind::Server, &mut h, vec![]);
    let out = h["traceparent"].to_str().unwrap().to_string();
    assert_eq!(out, span.traceparent());
    assert!(out.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{out}");
    assert!(!out.contains("b7ad6b7169203331") && out.ends_with("-01"), "{out}");
}

#[test]
fn disabled_tracer_starts_a_sampled_trace_without_a_parent() {
    let mut h = headers(None);
    let _span = Tracer::disabled().start("x", SpanKind::Server, &mut h, vec![]);
    let out = h["traceparent"].to_str().unwrap();
    let parts: Vec<&str> = out.split('-').collect();
    assert_eq!((parts.len(), parts[1].len(), parts[2].len(), parts[3]), (4, 32, 16, "01"), "{out}");
}

#[test]
fn malformed_traceparent_starts_a_new_trace() {
    let mut h = headers(Some("00-zz-nothex-01"));
    let _span = Tracer::disabled().start("x", SpanKind::Server, &mut h, vec![]);
    assert!(!h["traceparent"].to_str().unwrap().contains("zz"));
}

#[test]
fn exporting_tracer_parents_its_span_on_the_caller() {
    // Nothing listens there: export fails in the background, the request path is unaffected.
    let t = Tracer::otlp(&cfg("http://127.0.0.1:9/v1/traces")).unwrap();
    let mut h = headers(Some(PARENT));
    let span = t.start("x", SpanKind::Server, &mut h, vec![]);
    let out = h["traceparent"].to_str().unwrap();
    assert!(out.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && out.ends_with("-01"), "{out}");
    assert!(!out.contains("b7ad6b7169203331"));
    assert_eq!(span.traceparent(), out, "the log names the span the header hands on");
    span.finish(vec![KeyValue::new("http.response.status_code", 200)], None);
}

#[test]
fn unsampled_parent_is_not_sampled_onward() {
    let t = Tracer::otlp(&cfg("http://127.0.0.1:9/v1/traces")).unwrap();
    let mut h = headers(Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"));
    let _span = t.start("x", SpanKind::Server, &mut h, vec![]);
    assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
}

#[test]
fn endpoint_must_be_an_http_url() {
    for bad in ["collector:4318", "https://c:4318/v1/traces", "http:///v1/traces", "not a url"] {
        let e = Tracer::otlp(&cfg(bad)).unwrap_err();
        assert!(e.to_string().contains("OTLP endpoint"), "{bad}: {e}");
    }
}

#[test]
fn sampling_out_of_range_is_refused() {
    let mut c = cfg("http://127.0.0.1:9/v1/traces");
    c.sampling = 1.5;
    assert!(matches!(Tracer::otlp(&c), Err(TraceError::Sampling(_))));
}

/// What the SDK's propagator reads from `traceparent` and `tracestate`: the trace id, the
/// sampled flag and the `tracestate` it would write onward; `None` when not valid.
fn sdk_reading(h: &HeaderMap) -> Option<(u128, bool, String)> {
    let cx = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(h));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| (u128::from_be_bytes(sc.trace_id().to_bytes()), sc.is_sampled(), sc.trace_state().header()))
}

#[test]
fn the_local_path_reads_traceparent_as_the_sdk_does() {
    let cases = [
        PARENT,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-ff",
        "  00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01  ",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01--",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "fe-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-B7AD6B7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0A",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-1-2-1",
        "0-abc-def-1",
        "+0-abc-def-1",
        "00-+abc-def-01",
        "00-0af7651916cd43dd8448eb211c80319c0-b7ad6b7169203331-01",
        "00-zz-nothex-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "",
        "----",
    ];
    let states = [None, Some("congo=t61rcWkgMzE"), Some("a=1,b=2"), Some("not a valid state"), Some("")];
    for tp in cases {
        for state in states {
            let mut h = headers(None);
            h.insert("traceparent", http::HeaderValue::from_str(tp).unwrap());
            if let Some(s) = state {
                h.insert("tracestate", http::HeaderValue::from_str(s).unwrap());
            }
            let want = sdk_reading(&h);
            assert_eq!(parent(&h), want.as_ref().map(|(t, s, _)| (*t, *s)), "traceparent {tp:?}");
            let span = Tracer::disabled().start("x", SpanKind::Server, &mut h, vec![]);
            let out = h["traceparent"].to_str().unwrap().to_string();
            assert_eq!(out, span.traceparent());
            let onward = sdk_reading(&h).expect("a valid traceparent is handed on");
            match &want {
                Some((trace, sampled, state)) => {
                    assert_eq!((onward.0, onward.1), (*trace, *sampled), "{tp:?} -> {out}");
                    assert_eq!(h["tracestate"], state.as_str(), "{tp:?} {state:?}");
                }
                None => {
                    assert!(onward.1, "a new trace is sampled: {out}");
                    assert_eq!(h["tracestate"], "", "a new trace has no state");
                }
            }
        }
    }
}
