//! HTTP inside a tunnel to the waypoint: each request is checked against L7 policy, routed
//! by the service's VirtualService ([`crate::routing`] decides, this module acts), and sent
//! to an endpoint, with the rule's faults, mirrors, header changes, CORS, retries and
//! timeout applied as Envoy applies them.
//!
//! Request bodies are read whole (up to [`MAX_BODY`]) before sending, so a retry or a mirror
//! can send the same bytes again; response bodies stream through.
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use tracing::debug;

use super::access_log::Record;
use super::authz::{self, RequestFacts};
use super::headers::{
    apply, authority_of, cors_headers, framing, header_str, is_grpc, is_preflight, request_id, strip_hop_by_hop,
};
use super::send::{mirror, Send};
use super::telemetry::{GrpcStatus, Observed, Recorder, SeriesKey, TunnelSeries};
use super::upstream::Endpoint;
use super::Shared;
use crate::identity::Identity;
use crate::routing::spec::{Abort, Destination, Headers};
use crate::routing::{self, CompiledRoute, Decision, Retries, DEFAULT_RETRY_ON};
use crate::spans::Span;
use crate::state::Service;

/// Largest request body the waypoint buffers (for retries and mirrors); larger gets 413.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// How long a client has to send its request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Mirror copies in flight at once; more are skipped.
pub const MAX_MIRRORS: usize = 64;
/// How long a mirror copy may take.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (HTTP/1.1 buffer, HTTP/2 header list): larger is refused.
pub const MAX_HEADERS: usize = 16 * 1024;

/// The body of a response to the client.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// One accepted connection: who sent it and what it is for.
pub(crate) struct Tunnel {
    pub shared: Arc<Shared>,
    pub front: Front,
    /// The TCP peer (the client pod's address; never the `forwarded` header).
    pub peer_addr: SocketAddr,
    pub local_ip: IpAddr,
    /// What the client dialled: the service VIP and port (the CONNECT authority) for the
    /// mesh, the listener's address for an ingress.
    pub vip: SocketAddr,
    /// The request series this tunnel's requests count in.
    pub series: Arc<TunnelSeries>,
    /// Texts every request of the tunnel repeats (see [`TunnelText`]).
    pub text: TunnelText,
}

/// What each request's log line and headers repeat from its tunnel, rendered on the first
/// request that needs it rather than on every one (a keep-alive tunnel carries many).
#[derive(Default)]
pub(crate) struct TunnelText {
    peer: OnceLock<Arc<str>>,
    peer_addr: OnceLock<Arc<str>>,
    vip: OnceLock<Arc<str>>,
    forwarded_client_cert: OnceLock<Option<HeaderValue>>,
}

/// Which side of the mesh a connection came from, which decides policy and route lookup.
pub(crate) enum Front {
    /// An HBONE tunnel from a mesh workload to a service this waypoint serves.
    Mesh { peer: Identity, service: Arc<Service> },
    /// A client outside the mesh at an ingress listener: routes are the VirtualServices
    /// bound to one of the Istio `gateways` (`(namespace, name)`), chosen by host, else the
    /// routes of the listener (by port and host) of one of the Kubernetes Gateways
    /// `gateway_api` (class `istio`) that took the connection.
    Ingress { gateways: Arc<Vec<(String, String)>>, gateway_api: Arc<Vec<(String, String)>> },
}

impl Tunnel {
    pub(super) fn peer(&self) -> Option<&Identity> {
        match &self.front {
            Front::Mesh { peer, .. } => Some(peer),
            Front::Ingress { .. } => None,
        }
    }

    fn service(&self) -> Option<&Arc<Service>> {
        match &self.front {
            Front::Mesh { service, .. } => Some(service),
            Front::Ingress { .. } => None,
        }
    }

    /// The namespace short host names resolve in when no VirtualService says otherwise.
    pub(super) fn home_namespace(&self) -> &str {
        match &self.front {
            Front::Mesh { service, .. } => &service.namespace,
            Front::Ingress { .. } => &self.shared.name.0,
        }
    }

    /// The service port a destination without one means: the port the client dialled in the
    /// mesh; at an ingress, the service's only port (else the listener's port).
    pub(super) fn default_port(&self, svc: &Service) -> u16 {
        match (&self.front, svc.ports.len()) {
            (Front::Ingress { .. }, 1) => svc.ports.keys().next().copied().unwrap_or(self.vip.port()),
            _ => self.vip.port(),
        }
    }

    /// The caller's identity for logs and policy (`-` outside the mesh).
    fn peer_text(&self) -> Arc<str> {
        self.text.peer.get_or_init(|| self.peer().map(|p| p.to_string()).unwrap_or_else(|| "-".into()).into()).clone()
    }

    fn peer_addr_text(&self) -> Arc<str> {
        self.text.peer_addr.get_or_init(|| self.peer_addr.to_string().into()).clone()
    }

    fn vip_text(&self) -> Arc<str> {
        self.text.vip.get_or_init(|| self.vip.to_string().into()).clone()
    }

    /// `x-forwarded-client-cert` as the app receives it: the waypoint's identity (`By`) and
    /// the caller's (`URI`); none outside the mesh.
    fn forwarded_client_cert(&self) -> Option<HeaderValue> {
        self.text
            .forwarded_client_cert
            .get_or_init(|| {
                let peer = self.peer()?;
                HeaderValue::from_str(&format!("By={};URI={peer}", self.shared.upstreams.identity)).ok()
            })
            .clone()
    }
}

/// Serves HTTP/1.1 or HTTP/2 (detected from the first bytes) on a tunnel (or an ingress
/// connection) until it ends.
pub(crate) async fn serve<S>(t: Arc<Tunnel>, tunnel: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + std::marker::Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.http1().max_buf_size(MAX_HEADERS).timer(hyper_util::rt::TokioTimer::new());
    builder.http2().max_header_list_size(MAX_HEADERS as u32).timer(hyper_util::rt::TokioTimer::new());
    let svc = hyper::service::service_fn(move |req| handle(t.clone(), req));
    if let Err(e) = builder
        .serve_connection(hyper_util::rt::TokioIo::new(super::framing::FramingGuard::new(tunnel, MAX_HEADERS)), svc)
        .await
    {
        debug!(error = %e, "HTTP in tunnel ended with an error");
    }
}

/// What one request turned into, for metrics and the access log.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) flags: Vec<&'static str>,
    pub(super) upstream: Option<Endpoint>,
    pub(super) route: String,
    pub(super) request_bytes: u64,
}

impl Outcome {
    pub(super) fn flag(&mut self, f: &'static str) {
        if !self.flags.contains(&f) {
            self.flags.push(f);
        }
    }
}

async fn handle(t: Arc<Tunnel>, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    // The server span of this hop; from here on the request's `traceparent` names it, so the
    // upstream (and mirrors) are its children.
    let authority = authority_of(&req, t.vip);
    // Name and attributes only for a span that is exported (they cost a dozen allocations).
    let (name, attrs) = if t.shared.tracer.enabled() {
        let attrs = vec![
            KeyValue::new("http.request.method", req.method().to_string()),
            KeyValue::new("url.path", req.uri().path().to_string()),
            KeyValue::new("server.address", authority.clone()),
            KeyValue::new("istio.source_principal", t.peer_text().to_string()),
            KeyValue::new("istio.namespace", t.home_namespace().to_string()),
        ];
        (format!("{authority}{}", req.uri().path()), attrs)
    } else {
        (String::new(), Vec::new())
    };
    let span = t.shared.tracer.start(&name, SpanKind::Server, req.headers_mut(), attrs);
    let log = Record {
        start: Some(std::time::SystemTime::now()),
        method: req.method().to_string(),
        path: req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        authority,
        protocol: protocol_name(req.version()),
        source_principal: t.peer_text(),
        downstream_remote: t.peer_addr_text(),
        downstream_local: t.vip_text(),
        request_headers: t.shared.access_log.capture_request(req.headers()),
        traceparent: span.traceparent(),
        ..Default::default()
    };
    let grpc = is_grpc(req.headers());
    let mut out = Outcome::default();
    let resp = process(&t, req, &log.authority, &mut out).await;
    Ok(observe(&t, log, out, resp, grpc, started, span))
}

/// Labels and access-log fields of a request whose response head is ready; the metrics and
/// the log line are written when its body ends (for the bytes sent and gRPC trailers).
fn observe(
    t: &Tunnel,
    mut log: Record,
    mut out: Outcome,
    resp: Response<Body>,
    grpc: bool,
    started: Instant,
    span: Span,
) -> Response<Body> {
    let src = match &t.front {
        Front::Mesh { .. } => t.shared.state.snapshot().workload_by_ip(t.peer_addr.ip()),
        // An ingress gateway reports as the source of the request, as Istio's does: the
        // client outside the mesh is not a workload.
        Front::Ingress { .. } => None,
    };
    // Empty fields are written `-` by the log's formats.
    log.response_code = resp.status().as_u16();
    log.response_code_details = code_details(&resp, &out);
    log.response_flags = out.flags.join(",");
    log.route_name = std::mem::take(&mut out.route);
    if let Some(e) = &out.upstream {
        log.upstream_host = e.addr.to_string();
        log.upstream_cluster = e.service.hostname.clone();
    }
    log.bytes_received = out.request_bytes;
    log.response_headers = t.shared.access_log.capture_response(resp.headers());
    let key = SeriesKey {
        src,
        dst: out.upstream.as_ref().map(|e| e.workload.clone()),
        service: out.upstream.map(|e| e.service).or_else(|| t.service().cloned()),
        grpc,
        flags: out.flags,
        code: resp.status().as_u16(),
        grpc_status: GrpcStatus::of(header_str(resp.headers(), "grpc-status")),
    };
    let logger = t.shared.access_log.clone();
    let series = (t.shared.requests.clone(), t.series.clone(), key);
    let recorder = Recorder::new(series, (log, logger), started, out.request_bytes, span);
    resp.map(|body| Observed::new(body, recorder).boxed())
}

async fn process(t: &Tunnel, req: Request<Incoming>, authority: &str, out: &mut Outcome) -> Response<Body> {
    if let Err(why) = framing(req.headers()) {
        return refused(StatusCode::BAD_REQUEST, why);
    }
    if req.method() == Method::CONNECT {
        return refused(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied by the waypoint");
    }
    // Routing, policy and the upstream request all read the authority; a `Host` that is not
    // one (`reviews/other/path#`) could otherwise end up in the path the upstream is asked for.
    if authority.parse::<http::uri::Authority>().is_err() {
        return refused(StatusCode::BAD_REQUEST, "invalid authority");
    }
    let raw = req.uri().path_and_query().map_or("/", |p| p.as_str());
    // One normalized path for policy, routing and the upstream alike.
    let path = match super::path::normalize(raw) {
        Ok(p) => p,
        Err(bad) => return local(StatusCode::BAD_REQUEST, bad.0),
    };
    let path_only = path.split_once('?').map_or(path.as_str(), |(p, _)| p);
    let rreq = routing::Request {
        method: req.method().as_str().into(),
        scheme: req.uri().scheme_str().unwrap_or("http").into(),
        authority: authority.into(),
        path: path.as_str().into(),
        headers: {
            let mut h = Vec::with_capacity(req.headers().len());
            h.extend(req.headers().iter().filter_map(|(k, v)| Some((k.as_str().into(), v.to_str().ok()?.into()))));
            h
        },
        port: t.vip.port(),
    };
    let table = t.shared.routes.table();
    let route = match &t.front {
        Front::Mesh { peer, service } => {
            let principal = t.peer_text();
            let facts = RequestFacts {
                principal: Some(principal.strip_prefix("spiffe://").unwrap_or(&principal)),
                namespace: Some(peer.namespace()),
                source_ip: t.peer_addr.ip(),
                method: req.method().as_str(),
                path: path_only,
                host: authority,
                port: t.vip.port(),
                headers: req.headers(),
                http: true,
            };
            let svc = (service.namespace.as_str(), service.name.as_str());
            let waypoint = (t.shared.name.0.as_str(), t.shared.name.1.as_str());
            let poisoned = table.poisoned_for(svc, waypoint);
            if let Err(reason) = authz::evaluate(table.policies.values(), poisoned, svc, waypoint, &facts) {
                debug!(%reason, "request denied by L7 policy");
                t.shared.metrics.policy_denied("waypoint");
                return local(StatusCode::FORBIDDEN, "RBAC: access denied");
            }
            // Gateway API routes attached to the service (or the waypoint's Gateway) before
            // its VirtualService (see `gateway_routes`).
            table.mesh_route(service, t.vip.port(), Some(peer.namespace()), waypoint)
        }
        // Outside the mesh, only what a Gateway's routes route exists: an unknown host is
        // 404, as at Istio's ingress gateway.
        Front::Ingress { gateways, gateway_api } => {
            let host =
                authority.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()).map_or(authority, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            match table.ingress_route(gateways, gateway_api, t.vip.port(), host) {
                Some(r) => Some(r),
                None => {
                    out.flag("NR");
                    return local(StatusCode::NOT_FOUND, "no route for this host");
                }
            }
        }
    };
    let router = route.map(|r| r.router());
    let decision = route.and_then(|r| r.decide(&rreq, fastrand::u32(..)));
    let rule = match (route, &decision) {
        (Some(r), Some(d)) => {
            if d.rule() == routing::gateway_api::NO_MATCH {
                // A Gateway API parent answers 404 itself when no rule matches.
                out.flag("NR");
            }
            out.route = r.route_name(d.rule());
            r.router().rule(d.rule())
        }
        _ => None,
    };
    let origin = header_str(req.headers(), "origin").map(str::to_string);
    let cors = rule.and_then(|r| r.cors.as_ref()).filter(|c| origin.as_deref().is_some_and(|o| c.allows_origin(o)));
    if let (Some(c), true) = (cors, is_preflight(&req)) {
        let mut r = local(StatusCode::OK, "");
        cors_headers(r.headers_mut(), c, origin.as_deref().unwrap_or_default(), true);
        return r;
    }
    let vs_namespace = router.and_then(|r| r.name.split_once('/')).map(|(ns, _)| ns.to_string());
    let mut resp = match decision {
        Some(Decision::Redirect { code, location, .. }) => {
            let mut r = local(StatusCode::from_u16(code).unwrap_or(StatusCode::MOVED_PERMANENTLY), "");
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Some(Decision::Respond { status, body, .. }) => {
            local(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body)
        }
        Some(Decision::Forward { destination, path, authority, headers, .. }) => {
            let ns = vs_namespace.as_deref().unwrap_or(t.home_namespace());
            let target = Target { destination, path, authority, headers, namespace: ns };
            forward(t, req, out, rule, target, &table).await
        }
        None => match t.service() {
            // No rule matched (or no VirtualService): the service the client addressed.
            Some(service) => {
                let destination = Destination { host: service.hostname.clone(), subset: None, port: None };
                let ns = service.namespace.clone();
                let target =
                    Target { destination, path, authority: authority.to_string(), headers: None, namespace: &ns };
                forward(t, req, out, None, target, &table).await
            }
            None => {
                out.flag("NR");
                local(StatusCode::NOT_FOUND, "no route matched")
            }
        },
    };
    if let (Some(c), Some(o)) = (cors, origin.as_deref()) {
        cors_headers(resp.headers_mut(), c, o, false);
    }
    resp
}

/// Istio's retry policy for a route that sets none.
static DEFAULT_RETRIES: std::sync::LazyLock<Retries> =
    std::sync::LazyLock::new(|| Retries { attempts: 2, per_try_timeout: None, retry_on: DEFAULT_RETRY_ON.into() });

/// Where a forwarded request goes, after rewrites.
struct Target<'a> {
    destination: Destination,
    path: String,
    authority: String,
    headers: Option<Box<Headers>>,
    /// Namespace short host names resolve in.
    namespace: &'a str,
}

async fn forward(
    t: &Tunnel,
    req: Request<Incoming>,
    out: &mut Outcome,
    rule: Option<&CompiledRoute>,
    target: Target<'_>,
    table: &Arc<super::routes::RouteTable>,
) -> Response<Body> {
    let grpc = is_grpc(req.headers());
    if let Some(f) = rule.and_then(|r| r.fault.as_ref()) {
        if let Some(d) = &f.delay {
            let pct = d.percentage.map(|p| p.value).unwrap_or(100.0);
            if hit(pct) {
                if let Some(delay) = d.fixed_delay.as_deref().and_then(|s| routing::duration(s).ok()) {
                    out.flag("DI");
                    tokio::time::sleep(delay).await;
                }
            }
        }
        if let Some(a) = &f.abort {
            if hit(a.percentage.map(|p| p.value).unwrap_or(100.0)) {
                out.flag("FI");
                return abort(a, grpc);
            }
        }
    }
    let (parts, body) = req.into_parts();
    let collected = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Ok(c) => c,
        Err(_) => return local(StatusCode::REQUEST_TIMEOUT, "request body not received in time"),
    };
    let body = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return match e.downcast::<http_body_util::LengthLimitError>() {
                Ok(_) => local(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
                Err(e) => {
                    debug!(error = %e, "client body failed");
                    local(StatusCode::BAD_REQUEST, "request body could not be read")
                }
            }
        }
    };
    out.request_bytes = body.len() as u64;
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    // The app learns the caller from the waypoint, never from what the caller wrote.
    headers.remove(&super::headers::X_FORWARDED_CLIENT_CERT);
    if let Some(v) = t.forwarded_client_cert() {
        headers.insert(super::headers::X_FORWARDED_CLIENT_CERT.clone(), v);
    }
    for ops in [rule.and_then(|r| r.headers.as_ref()), target.headers.as_deref()].into_iter().flatten() {
        apply(&mut headers, ops.request.as_ref());
    }
    request_id(&mut headers);
    let snap = t.shared.state.snapshot();
    let host = &target.destination.host;
    let Some(svc) = snap.service_by_host(host, target.namespace) else {
        out.flag("NR");
        return local(StatusCode::SERVICE_UNAVAILABLE, format!("no service {host}"));
    };
    let port = target.destination.port.as_ref().map(|p| p.number as u16).unwrap_or_else(|| t.default_port(&svc));
    let subset = match &target.destination.subset {
        Some(s) => match table.subset_labels(host, s) {
            Some(l) => Some((s.as_str(), l)),
            None => {
                out.flag("NR");
                return local(StatusCode::SERVICE_UNAVAILABLE, format!("subset {s} of {host} is not defined"));
            }
        },
        None => None,
    };
    // Endpoints are spoken to in HTTP/1.1, gRPC in HTTP/2 (it needs trailers and streams).
    let h2 = grpc;
    let send = Send { t, method: parts.method, path: target.path, headers, body, h2 };
    for (m, pct) in rule.map(|r| r.mirrors.as_slice()).unwrap_or_default() {
        if hit(*pct) {
            mirror(t, &snap, m, &send, &target.authority, target.namespace, table);
        }
    }
    let retries = rule.map_or(&*DEFAULT_RETRIES, |r| &r.retries);
    let cluster = t.shared.traffic.cluster((&snap, table), host, &svc, port, t.vip.ip(), subset, t.local_ip);
    let attempts = send.attempts(&cluster, &target.authority, retries, out);
    let mut resp = match rule.and_then(|r| r.timeout) {
        Some(limit) => match tokio::time::timeout(limit, attempts).await {
            Ok(r) => r,
            Err(_) => {
                out.flag("UT");
                local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
            }
        },
        None => attempts.await,
    };
    for ops in [rule.and_then(|r| r.headers.as_ref()), target.headers.as_deref()].into_iter().flatten() {
        apply(resp.headers_mut(), ops.response.as_ref());
    }
    resp
}

/// An injected abort: the HTTP status, or for gRPC a trailers-only answer with the status.
fn abort(a: &Abort, grpc: bool) -> Response<Body> {
    match (&a.grpc_status, a.http_status) {
        (Some(code), _) if grpc || a.http_status.is_none() => {
            let mut r = local(StatusCode::OK, "");
            let num = grpc_code(code).to_string();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            if let Ok(v) = HeaderValue::from_str(&num) {
                r.headers_mut().insert("grpc-status", v);
            }
            r.headers_mut().insert("grpc-message", HeaderValue::from_static("fault filter abort"));
            r
        }
        (_, Some(s)) => {
            local(StatusCode::from_u16(s as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), "fault filter abort")
        }
        _ => local(StatusCode::INTERNAL_SERVER_ERROR, "fault filter abort"),
    }
}

/// gRPC status names (as Istio's `grpcStatus` takes them) to codes.
fn grpc_code(name: &str) -> u32 {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    name.parse().unwrap_or_else(|_| NAMES.iter().position(|n| n.eq_ignore_ascii_case(name)).unwrap_or(2) as u32)
}

/// A response the waypoint makes itself.
/// Marks a response the waypoint made itself (not the upstream's).
#[derive(Clone, Copy)]
struct LocalReply;

/// Envoy's `%RESPONSE_CODE_DETAILS%` for `resp`: `via_upstream`, or why the waypoint answered.
fn code_details(resp: &Response<Body>, out: &Outcome) -> &'static str {
    if resp.extensions().get::<LocalReply>().is_none() {
        return "via_upstream";
    }
    let flagged = |f| out.flags.contains(&f);
    match resp.status().as_u16() {
        _ if flagged("FI") => "fault_filter_abort",
        _ if flagged("UT") => "upstream_response_timeout",
        _ if flagged("UH") => "no_healthy_upstream",
        _ if flagged("UF") || flagged("URX") => "upstream_reset_before_response_started",
        _ if flagged("NR") => "route_not_found",
        403 => "rbac_access_denied_matched_policy",
        301..=308 | 200 => "direct_response",
        400 | 405 | 408 | 413 => "request_rejected",
        _ => "local_reply",
    }
}

/// A request the waypoint will not handle: answered by [`local`], and the connection closed
/// after it, since what follows on it cannot be trusted to be framed or meant as sent.
fn refused(status: StatusCode, why: &'static str) -> Response<Body> {
    let mut r = local(status, why);
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

pub(super) fn local(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let body: Bytes = body.into();
    let mut r = Response::new(Full::new(body.clone()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.extensions_mut().insert(LocalReply);
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    if !body.is_empty() {
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    r
}

fn hit(percent: f64) -> bool {
    percent >= 100.0 || fastrand::f64() * 100.0 < percent
}

/// The protocol as Envoy's `%PROTOCOL%` names it.
fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_log_names_protocols_as_envoy_does() {
        assert_eq!(protocol_name(Version::HTTP_11), "HTTP/1.1");
        assert_eq!(protocol_name(Version::HTTP_10), "HTTP/1.0");
        // Envoy's %PROTOCOL% (not the http crate's `HTTP/2.0`).
        assert_eq!(protocol_name(Version::HTTP_2), "HTTP/2");
    }
}
