//! An OTLP/HTTP trace receiver for the trace tests: it listens in a pod, takes
//! `POST /v1/traces` bodies in protobuf, decodes them with the official OpenTelemetry schema
//! (`opentelemetry-proto`) and keeps every span with its resource's `service.name`, so a test
//! can check a trace's parent/child chain exactly as a collector would see it.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use tokio::sync::oneshot;

use crate::{InNetns, Pod};

/// One received span, ids as lower-case hex like `traceparent`.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// `SPAN_KIND_*` number (2 server, 3 client).
    pub kind: i32,
    pub attributes: Vec<(String, String)>,
}

impl ReceivedSpan {
    /// The value of attribute `key`, as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// The receiver; stops when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    _stop: oneshot::Sender<()>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// Flattens a decoded export request into spans.
pub fn decode(body: &[u8]) -> Result<Vec<ReceivedSpan>> {
    let req = ExportTraceServiceRequest::decode(body).context("not an OTLP ExportTraceServiceRequest")?;
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .map(|a| text(a.value.as_ref().and_then(|v| v.value.as_ref())))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    kind: s.kind,
                    attributes: s
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), text(a.value.as_ref().and_then(|v| v.value.as_ref()))))
                        .collect(),
                });
            }
        }
    }
    Ok(out)
}

impl OtlpReceiver {
    /// Listens on `[::]:port` inside `pod`.
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
        let listener = pod
            .run(move || -> std::io::Result<std::net::TcpListener> {
                let l = std::net::TcpListener::bind(("::", port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .context("binding the OTLP receiver")?;
        Self::serve(listener, SocketAddr::new(pod.ip4().into(), port))
    }

    /// Listens on a free loopback port of the test's own netns, where in-process node agents
    /// (like a DaemonSet's agent in the host netns) export from.
    pub fn start_local() -> Result<Self> {
        let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding the OTLP receiver")?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        Self::serve(l, addr)
    }

    fn serve(listener: std::net::TcpListener, addr: SocketAddr) -> Result<Self> {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = oneshot::channel::<()>();
        let kept = spans.clone();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::spawn(move || {
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let serve = async {
                    loop {
                        let Ok((s, _)) = listener.accept().await else { continue };
                        let kept = kept.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| receive(req, kept.clone()));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    _ = serve => {}
                }
            });
        });
        Ok(OtlpReceiver { addr, spans, _stop: stop })
    }

    /// Where exporters post (`http://<pod ip>:<port>/v1/traces`).
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// The flags that make a waypoint or gateway export every request's span here, quickly.
    pub fn proxy_args(&self) -> Vec<String> {
        ["--otlp-endpoint", &self.endpoint(), "--trace-sampling", "100", "--trace-export-delay-ms", "100"]
            .map(String::from)
            .to_vec()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until a span matches `f`.
    pub fn wait_for(&self, what: &str, f: impl Fn(&ReceivedSpan) -> bool, timeout: Duration) -> Result<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.spans().into_iter().find(|s| f(s)) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("no span {what} within {timeout:?}; received: {:#?}", self.spans());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

async fn receive(
    req: Request<hyper::body::Incoming>,
    kept: Arc<Mutex<Vec<ReceivedSpan>>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let reply = |code: StatusCode, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r.headers_mut().insert("content-type", "application/x-protobuf".parse().unwrap());
        r
    };
    let proto = req.headers().get("content-type").is_some_and(|v| v.as_bytes() == b"application/x-protobuf");
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/traces" || !proto {
        return Ok(reply(StatusCode::NOT_FOUND, vec![]));
    }
    let body = req.into_body().collect().await?.to_bytes();
    Ok(match decode(&body) {
        Ok(spans) => {
            kept.lock().unwrap().extend(spans);
            reply(StatusCode::OK, ExportTraceServiceResponse::default().encode_to_vec())
        }
        Err(e) => reply(StatusCode::BAD_REQUEST, e.to_string().into_bytes()),
    })
}
