//! Copying a proxied connection's bytes and reporting it once, the same way for every
//! direction: access-log line, Istio TCP metrics, a record for subscribers, and the
//! connection's entry among the node's open ones while it lasts (`connections`).
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use super::connections::LiveGuard;
use super::ProxyContext;
use crate::hbone::CopyIo;
use crate::metrics::{ConnectionCounters, ConnectionLabels, Reporter};

/// Which listener a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
    InboundPassthrough,
}

/// One finished proxied connection: the access-log line, also published to subscribers
/// (tests, the admin API) so behaviour is observable without scraping logs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionRecord {
    pub direction: Direction,
    pub pod: String,
    pub src: SocketAddr,
    /// The original destination (for outbound, recovered from the kernel programs).
    pub dst: SocketAddr,
    /// `"HBONE"` when carried in mTLS, `"TCP"` otherwise.
    pub protocol: &'static str,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
    pub error: Option<String>,
}

impl ConnectionRecord {
    /// A record for a connection that is starting.
    pub fn new(ctx: &ProxyContext, direction: Direction, src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            direction,
            pod: ctx.pod.uid.clone(),
            src,
            dst,
            protocol: "TCP",
            src_identity: None,
            dst_identity: None,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0,
            error: None,
        }
    }
}

/// Copies between `client` and `upstream` until both directions close; `upstream` reports
/// the connection when it is dropped. Callers set up the connection in a separate (boxed)
/// future, so an idle connection's task holds only this copy's state.
pub async fn splice<C, U>(mut client: C, mut upstream: Metered<U>)
where
    C: CopyIo,
    U: CopyIo,
{
    if let Err(e) = crate::hbone::copy_chunks(&mut client, &mut upstream).await {
        upstream.fail(format!("copy: {e}"));
    }
}

/// Refuses a connection that will not be relayed: reports it with `reason` and resets
/// the client.
pub fn refuse(ctx: &ProxyContext, mut rec: ConnectionRecord, client: tokio::net::TcpStream, reason: String) {
    rec.error = Some(reason);
    finish(ctx, rec);
    super::socket::reset(client);
}

/// Reports a connection that ended without a relay (failed connect, denied).
pub fn finish(ctx: &ProxyContext, rec: ConnectionRecord) {
    log_record(&rec);
    let _ = ctx.mesh.events.send(rec);
}

/// Istio-style labels for a connection reported by `reporter`: workload, canonical
/// service/revision, version (the revision), namespace and cluster of each side, the
/// addressed service, the principals proven in mTLS.
pub fn labels(
    reporter: Reporter,
    rec: &ConnectionRecord,
    src: Option<&crate::state::Workload>,
    dst: Option<&crate::state::Workload>,
    service: Option<&crate::state::Service>,
) -> ConnectionLabels {
    let unknown = || "unknown".to_string();
    let mut l = workload_labels(reporter, src, dst, service);
    l.source_principal = rec.src_identity.clone().unwrap_or_else(unknown);
    l.destination_principal = rec.dst_identity.clone().unwrap_or_else(unknown);
    l.request_protocol = "tcp".into();
    l.response_flags = "-".into();
    l.connection_security_policy = if rec.protocol == "HBONE" { "mutual_tls".into() } else { "unknown".into() };
    l
}

/// The workload and service part of Istio's labels (shared with the waypoint's request
/// metrics); principals, protocol and flags are left at their defaults.
pub fn workload_labels(
    reporter: Reporter,
    src: Option<&crate::state::Workload>,
    dst: Option<&crate::state::Workload>,
    service: Option<&crate::state::Service>,
) -> ConnectionLabels {
    let mut l = ConnectionLabels { reporter, ..Default::default() };
    if let Some(w) = src.map(SideLabels::of) {
        l.source_workload = w.workload;
        l.source_workload_namespace = w.namespace;
        l.source_app = w.canonical.clone();
        l.source_canonical_service = w.canonical;
        l.source_version = w.revision.clone();
        l.source_canonical_revision = w.revision;
        l.source_cluster = w.cluster;
    }
    if let Some(w) = dst.map(SideLabels::of) {
        l.destination_workload = w.workload;
        l.destination_workload_namespace = w.namespace;
        l.destination_app = w.canonical.clone();
        l.destination_canonical_service = w.canonical;
        l.destination_version = w.revision.clone();
        l.destination_canonical_revision = w.revision;
        l.destination_cluster = w.cluster;
    }
    if let Some(s) = service {
        l.destination_service = s.hostname.clone();
        l.destination_service_name = s.name.clone();
        l.destination_service_namespace = s.namespace.clone();
    }
    l
}

/// The label values one side of a connection contributes, `"unknown"` where empty: the
/// workload is the owning workload's name (a Deployment's, as Istio's `source_workload`),
/// else the pod's; the canonical service is the canonical name or else the workload name,
/// and Istio reports the canonical revision as the version too.
struct SideLabels {
    workload: String,
    namespace: String,
    canonical: String,
    revision: String,
    cluster: String,
}

impl SideLabels {
    fn of(w: &crate::state::Workload) -> Self {
        let or_unknown = |s: &str| if s.is_empty() { "unknown".to_string() } else { s.to_string() };
        let workload = if w.workload_name.is_empty() { &w.name } else { &w.workload_name };
        let canonical = if w.canonical_name.is_empty() { workload } else { &w.canonical_name };
        SideLabels {
            workload: or_unknown(workload),
            namespace: or_unknown(&w.namespace),
            canonical: or_unknown(canonical),
            revision: or_unknown(&w.canonical_revision),
            cluster: or_unknown(&w.cluster_id),
        }
    }
}

/// Labels of a connection the destination pod reports: this pod's workload, and the
/// source workload known at the TCP peer's address.
pub fn destination_labels(ctx: &ProxyContext, rec: &ConnectionRecord, peer: std::net::IpAddr) -> ConnectionLabels {
    let snap = ctx.mesh.state.snapshot();
    let dst = ctx.pod.workload(&snap).unwrap_or_else(|| ctx.pod.stand_in());
    let src = snap.workload_by_ip(peer);
    labels(Reporter::Destination, rec, src.as_deref(), Some(&dst), None)
}

/// Istio's `response_flags` for a connection refused by authorization policy.
pub const FLAG_DENY: &str = "DENY";
/// Istio's `response_flags` for a connection whose upstream could not be reached.
pub const FLAG_CONNECT: &str = "CONNECT";

/// Whether access-log lines are JSON (`LOG_FORMAT=json`), read once.
fn json_logs() -> bool {
    static JSON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *JSON.get_or_init(|| std::env::var("LOG_FORMAT").as_deref() == Ok("json"))
}

fn log_record(rec: &ConnectionRecord) {
    if json_logs() {
        if let Ok(line) = serde_json::to_string(rec) {
            info!(target: "access", "{line}");
        }
        return;
    }
    let id = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    match &rec.error {
        None => info!(target: "access", direction = ?rec.direction, pod = %rec.pod, src = %rec.src,
            dst = %rec.dst, protocol = rec.protocol, src_identity = %id(&rec.src_identity), dst_identity = %id(&rec.dst_identity),
            bytes_sent = rec.bytes_sent, bytes_recv = rec.bytes_received, duration_ms = rec.duration_ms, "connection complete"),
        Some(e) => warn!(target: "access", direction = ?rec.direction, pod = %rec.pod, src = %rec.src,
            dst = %rec.dst, protocol = rec.protocol, src_identity = %id(&rec.src_identity),
            duration_ms = rec.duration_ms, error = %e, "connection failed"),
    }
}

/// A stream that reports its connection when dropped, counting bytes as they pass: used
/// where the copy loop belongs to someone else (the HBONE server splices tunnels itself).
/// Every relayed connection of every direction goes through one, so it is also where the
/// connection is listed among the node's open connections (`connections`), until dropped.
pub struct Metered<S> {
    inner: S,
    report: Option<(ProxyContext, ConnectionRecord, ConnectionCounters, Instant)>,
    /// The connection's entry among the open ones, which also counts its bytes: to the
    /// upstream (written into `inner`, from the client) and from it (read from `inner`).
    live: LiveGuard,
    /// The connection's span, ended with it (only when connection spans are on).
    span: Option<crate::spans::Span>,
}

/// A span for a connection of `rec`'s direction, child of `parent` (a `traceparent`) when
/// given, else the root of a new trace; `None` when the agent emits no connection spans.
pub fn connection_span(ctx: &ProxyContext, rec: &ConnectionRecord, parent: Option<&str>) -> Option<crate::spans::Span> {
    use opentelemetry::trace::SpanKind;
    use opentelemetry::KeyValue;
    if !ctx.mesh.tracer.enabled() {
        return None;
    }
    let mut h = http::HeaderMap::new();
    if let Some(v) = parent.and_then(|p| http::HeaderValue::from_str(p).ok()) {
        h.insert("traceparent", v);
    }
    let (name, kind) = match rec.direction {
        Direction::Outbound => ("outbound", SpanKind::Client),
        _ => ("inbound", SpanKind::Server),
    };
    let attrs = vec![
        KeyValue::new("network.protocol.name", rec.protocol),
        KeyValue::new("source.address", rec.src.to_string()),
        KeyValue::new("destination.address", rec.dst.to_string()),
        KeyValue::new("istio.source_principal", rec.src_identity.clone().unwrap_or_default()),
        KeyValue::new("istio.destination_principal", rec.dst_identity.clone().unwrap_or_default()),
        KeyValue::new("k8s.pod.uid", rec.pod.clone()),
    ];
    Some(ctx.mesh.tracer.start(&format!("{name} {}", rec.dst), kind, &mut h, attrs))
}

impl<S> Metered<S> {
    /// Ends `span` with the connection.
    pub fn with_span(mut self, span: Option<crate::spans::Span>) -> Self {
        self.span = span;
        self
    }

    /// Starts metering: counts the connection as opened now and lists it as open.
    pub fn new(inner: S, ctx: &ProxyContext, rec: ConnectionRecord, labels: ConnectionLabels) -> Self {
        let counters = ctx.mesh.metrics.open_connection(&labels);
        let live = ctx.mesh.connections.open(&rec, &labels);
        Self { inner, report: Some((ctx.clone(), rec, counters, Instant::now())), live, span: None }
    }

    /// Records why the connection ended badly, for its report.
    pub fn fail(&mut self, reason: String) {
        if let Some((_, rec, _, _)) = self.report.as_mut() {
            rec.error = Some(reason);
        }
    }
}

impl<S> Drop for Metered<S> {
    fn drop(&mut self) {
        // `live` is dropped after this, removing the connection from the open ones.
        if let Some((ctx, mut rec, counters, start)) = self.report.take() {
            rec.bytes_sent = self.live.sent();
            rec.bytes_received = self.live.received();
            rec.duration_ms = start.elapsed().as_millis() as u64;
            counters.close(rec.bytes_received, rec.bytes_sent);
            if let Some(span) = self.span.take() {
                use opentelemetry::KeyValue;
                let attrs = vec![
                    KeyValue::new("istio.bytes_sent", rec.bytes_sent as i64),
                    KeyValue::new("istio.bytes_received", rec.bytes_received as i64),
                ];
                span.finish(attrs, rec.error.clone());
            }
            finish(&ctx, rec);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.live.add_received(n);
        }
        r
    }
}

/// Counts chunks as `poll_read`/`poll_write` count bytes.
impl<S: CopyIo> CopyIo for Metered<S> {
    fn reads_chunks(&self) -> bool {
        self.inner.reads_chunks()
    }
    fn poll_read_chunk(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<Bytes>> {
        let r = self.inner.poll_read_chunk(cx);
        if let std::task::Poll::Ready(Ok(chunk)) = &r {
            if !chunk.is_empty() {
                self.live.add_received(chunk.len() as u64);
            }
        }
        r
    }
    fn poll_write_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
        chunk: &Bytes,
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = self.inner.poll_write_chunk(cx, chunk);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                self.live.add_sent(*n as u64);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                self.live.add_sent(*n as u64);
            }
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
