//! HTTP inside a tunnel to the waypoint: each request is checked against L7 policy, routed
//! by the service's VirtualService ([`crate::routing`] decides, this module acts), and sent
//! to an endpoint, with the rule's faults, mirrors, header changes, CORS, retries and
//! timeout applied as Envoy applies them.
//!
//! Request bodies are read whole (up to [`MAX_BODY`]) before sending, so a retry or a mirror
//! can send the same bytes again; response bodies stream through.
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use tracing::debug;

use super::access_log::Record;
use super::authz::{self, RequestFacts};
use super::lb::RequestView;
use super::outlier::Outcome as OutlierOutcome;
use super::telemetry::{GrpcStatus, Observed, Recorder, SeriesKey, TunnelSeries};
use super::traffic::Cluster;
use super::upstream::{self, Endpoint, SendError};
use super::Shared;
use crate::hbone::ConnectHeaders;
use crate::identity::Identity;
use crate::routing::spec::{Abort, Destination, HeaderOperations, Headers};
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
    fn peer(&self) -> Option<&Identity> {
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

    /// The caller's identity for logs and `x-forwarded-client-cert` (`-` outside the mesh).
    fn peer_text(&self) -> String {
        self.peer().map(|p| p.to_string()).unwrap_or_else(|| "-".into())
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
struct Outcome {
    flags: Vec<&'static str>,
    upstream: Option<Endpoint>,
    route: String,
    request_bytes: u64,
}

impl Outcome {
    fn flag(&mut self, f: &'static str) {
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
            KeyValue::new("istio.source_principal", t.peer_text()),
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
        protocol: format!("{:?}", req.version()),
        source_principal: t.peer_text(),
        downstream_remote: t.peer_addr.to_string(),
        downstream_local: t.vip.to_string(),
        request_headers: t.shared.access_log.capture_request(req.headers()),
        traceparent: span.traceparent(),
        ..Default::default()
    };
    let grpc = is_grpc(req.headers());
    let mut out = Outcome::default();
    let resp = process(&t, req, &mut out).await;
    Ok(observe(&t, log, &out, resp, grpc, started, span))
}

/// Labels and access-log fields of a request whose response head is ready; the metrics and
/// the log line are written when its body ends (for the bytes sent and gRPC trailers).
fn observe(
    t: &Tunnel,
    mut log: Record,
    out: &Outcome,
    resp: Response<Body>,
    grpc: bool,
    started: Instant,
    span: Span,
) -> Response<Body> {
    let service = out.upstream.as_ref().map(|e| &e.service).or(t.service()).cloned();
    let src = match &t.front {
        Front::Mesh { .. } => t.shared.state.snapshot().workload_by_ip(t.peer_addr.ip()),
        // An ingress gateway reports as the source of the request, as Istio's does: the
        // client outside the mesh is not a workload.
        Front::Ingress { .. } => None,
    };
    let key = SeriesKey {
        src,
        dst: out.upstream.as_ref().map(|e| e.workload.clone()),
        service,
        grpc,
        flags: out.flags.clone(),
        code: resp.status().as_u16(),
        grpc_status: GrpcStatus::of(header_str(resp.headers(), "grpc-status")),
    };
    // `-` when empty, written by the log's formats.
    let flags = out.flags.join(",");
    log.response_code = resp.status().as_u16();
    log.response_flags = flags;
    log.route_name = out.route.clone();
    log.upstream_host = out.upstream.as_ref().map(|e| e.addr.to_string()).unwrap_or_else(|| "-".into());
    log.upstream_cluster = out.upstream.as_ref().map(|e| e.service.hostname.clone()).unwrap_or_else(|| "-".into());
    log.bytes_received = out.request_bytes;
    log.response_code_details = code_details(&resp, out).to_string();
    log.response_headers = t.shared.access_log.capture_response(resp.headers());
    let logger = t.shared.access_log.clone();
    let series = (t.shared.requests.clone(), t.series.clone(), key);
    let recorder = Recorder::new(series, (log, logger), started, out.request_bytes, span);
    resp.map(|body| Observed::new(body, recorder).boxed())
}

async fn process(t: &Tunnel, req: Request<Incoming>, out: &mut Outcome) -> Response<Body> {
    if let Err(why) = framing(req.headers()) {
        let mut r = local(StatusCode::BAD_REQUEST, why);
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    if req.method() == Method::CONNECT {
        let mut r = local(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied by the waypoint");
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    let authority = authority_of(&req, t.vip);
    let raw = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into());
    // One normalized path for policy, routing and the upstream alike.
    let path = match super::path::normalize(&raw) {
        Ok(p) => p,
        Err(bad) => return local(StatusCode::BAD_REQUEST, bad.0),
    };
    let path_only = path.split_once('?').map(|(p, _)| p).unwrap_or(&path).to_string();
    let rreq = routing::Request {
        method: req.method().as_str().into(),
        scheme: req.uri().scheme_str().unwrap_or("http").into(),
        authority: authority.as_str().into(),
        path: path.as_str().into(),
        headers: req.headers().iter().filter_map(|(k, v)| Some((k.as_str().into(), v.to_str().ok()?.into()))).collect(),
        port: t.vip.port(),
    };
    let table = t.shared.routes.table();
    let route = match &t.front {
        Front::Mesh { peer, service } => {
            let principal = peer.to_string();
            let facts = RequestFacts {
                principal: Some(principal.strip_prefix("spiffe://").unwrap_or(&principal)),
                namespace: Some(peer.namespace()),
                source_ip: t.peer_addr.ip(),
                method: req.method().as_str(),
                path: &path_only,
                host: &authority,
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
                authority.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()).map_or(&*authority, |(h, _)| h);
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
                let target = Target { destination, path, authority, headers: None, namespace: &ns };
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
    headers.remove("x-forwarded-client-cert");
    if let Some(peer) = t.peer() {
        if let Ok(v) = HeaderValue::from_str(&format!("By={};URI={peer}", t.shared.upstreams.identity)) {
            headers.insert("x-forwarded-client-cert", v);
        }
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
    let send = Send { t, method: parts.method.clone(), path: target.path.clone(), headers, body, h2 };
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

/// A request ready to send (again).
struct Send<'a> {
    t: &'a Tunnel,
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    h2: bool,
}

impl Send<'_> {
    fn request(&self, authority: &str) -> Option<Request<Full<Bytes>>> {
        let uri: Uri =
            if self.h2 { format!("http://{authority}{}", self.path).parse().ok()? } else { self.path.parse().ok()? };
        let mut req =
            Request::builder().method(self.method.clone()).uri(uri).body(Full::new(self.body.clone())).ok()?;
        *req.headers_mut() = self.headers.clone();
        if !self.h2 {
            req.headers_mut().insert(header::HOST, HeaderValue::from_str(authority).ok()?);
        } else {
            req.headers_mut().remove(header::HOST);
        }
        *req.version_mut() = if self.h2 { Version::HTTP_2 } else { Version::HTTP_11 };
        Some(req)
    }

    fn connect_headers(&self) -> ConnectHeaders {
        ConnectHeaders {
            forwarded_for: Some(self.t.peer_addr),
            forwarded_host: None,
            baggage: None,
            traceparent: header_str(&self.headers, "traceparent").map(str::to_string),
            extra: Default::default(),
        }
    }

    /// Sends with the retry policy: each attempt picks an endpoint of `cluster` (by its load
    /// balancer, among the endpoints outlier detection has not ejected) under its
    /// connection-pool limits; a retriable failure or status is tried again (after a short,
    /// growing back-off, while the retry budget allows) until attempts run out.
    async fn attempts(
        &self,
        cluster: &Cluster,
        authority: &str,
        retries: &Retries,
        out: &mut Outcome,
    ) -> Response<Body> {
        let policy = RetryOn::parse(&retries.retry_on);
        let tries = 1 + retries.attempts;
        let svc = &cluster_service(cluster);
        let (_request, _connection) = match cluster.admit().await {
            Ok(p) => p,
            Err(overflow) => {
                debug!(%overflow, service = %svc, "circuit breaker");
                out.flag("UO");
                return local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                );
            }
        };
        let mut _retry = None;
        for attempt in 0..tries {
            if attempt > 0 {
                self.t.shared.requests.retried(svc);
                tokio::time::sleep(Duration::from_millis(25 * (1 << attempt.min(4)) as u64)).await;
            }
            let view = RequestView { headers: &self.headers, path: &self.path, source: self.t.peer_addr, target: None };
            let Some(chosen) = cluster.pick(&view) else {
                out.flag("UH");
                return local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
            };
            let ep = chosen.endpoint.clone();
            out.upstream = Some(ep.clone());
            let Some(req) = self.request(authority) else {
                return local(StatusCode::BAD_REQUEST, "request cannot be forwarded");
            };
            let per_connection = cluster.breaker.max_requests_per_connection();
            let sent = self.t.shared.upstreams.send(
                &ep,
                req,
                self.h2,
                self.t.local_ip,
                self.connect_headers(),
                per_connection,
            );
            let result = match retries.per_try_timeout {
                Some(d) => tokio::time::timeout(d, sent).await.unwrap_or(Err(SendError::PerTryTimeout(d))),
                None => sent.await,
            };
            cluster.record(
                ep.addr,
                match &result {
                    Ok(r) => OutlierOutcome::Response(r.status().as_u16()),
                    Err(SendError::Connect(..)) => OutlierOutcome::ConnectFailure,
                    Err(SendError::PerTryTimeout(_)) => OutlierOutcome::Timeout,
                    Err(SendError::Reset(_)) => OutlierOutcome::Reset,
                },
            );
            // A retry needs room in the cluster's retry budget (`maxRetries`); without it the
            // answer so far stands.
            let mut last = attempt + 1 == tries;
            if !last {
                match cluster.breaker.retry() {
                    Ok(p) => _retry = Some(p),
                    Err(_) => last = true,
                }
            }
            let cookie = chosen.set_cookie.clone();
            match result {
                Ok(resp) if policy.retries_response(&resp) && !last => {}
                Ok(resp) => {
                    if attempt > 0 && policy.retries_response(&resp) {
                        out.flag("URX");
                    }
                    let mut resp = resp.map(|b| b.boxed());
                    if let Some(v) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
                        resp.headers_mut().append(header::SET_COOKIE, v);
                    }
                    return resp;
                }
                Err(e) => {
                    debug!(error = %e, attempt, upstream = %ep.addr, "upstream attempt failed");
                    if last || !policy.retries_error(&e) {
                        out.flag(if attempt > 0 {
                            "URX"
                        } else if matches!(e, SendError::PerTryTimeout(_)) {
                            "UT"
                        } else {
                            "UF"
                        });
                        return local(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "upstream connect error or disconnect/reset before headers",
                        );
                    }
                }
            }
        }
        unreachable!("the last attempt always returns")
    }
}

fn cluster_service(c: &Cluster) -> String {
    c.service.hostname.clone()
}

/// A fire-and-forget copy to a mirror target, with `-shadow` appended to the host.
fn mirror(
    t: &Tunnel,
    snap: &crate::state::Snapshot,
    m: &Destination,
    send: &Send<'_>,
    authority: &str,
    namespace: &str,
    table: &super::routes::RouteTable,
) {
    let Some(svc) = snap.service_by_host(&m.host, namespace) else {
        return debug!(host = %m.host, "mirror target unknown");
    };
    let subset = m.subset.as_ref().and_then(|s| table.subset_labels(&m.host, s));
    let port = m.port.as_ref().map(|p| p.number as u16).unwrap_or_else(|| t.default_port(&svc));
    let Some(ep) = upstream::pick(snap, &svc, port, t.vip.ip(), subset) else {
        return debug!(host = %m.host, "mirror target has no endpoint");
    };
    let shadow = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => format!("{h}-shadow:{p}"),
        _ => format!("{authority}-shadow"),
    };
    let Some(req) = send.request(&shadow) else { return };
    // Copies are bounded: past MAX_MIRRORS in flight they are skipped, and each gets
    // MIRROR_TIMEOUT, so a slow mirror target cannot pile up bodies in the waypoint.
    let Ok(permit) = t.shared.mirrors.clone().try_acquire_owned() else {
        return debug!(host = %m.host, "mirror skipped: too many in flight");
    };
    let (shared, h2, local_ip, headers) = (t.shared.clone(), send.h2, t.local_ip, send.connect_headers());
    tokio::spawn(async move {
        let copy = async {
            match shared.upstreams.send(&ep, req, h2, local_ip, headers, None).await {
                Ok(resp) => {
                    let _ = resp.into_body().collect().await;
                }
                Err(e) => debug!(error = %e, "mirror failed"),
            }
        };
        let _ = tokio::time::timeout(MIRROR_TIMEOUT, copy).await;
        drop(permit);
    });
}

/// Envoy's `retry_on` conditions.
struct RetryOn {
    any_5xx: bool,
    gateway: bool,
    reset: bool,
    connect: bool,
    retriable_4xx: bool,
    codes: Vec<u16>,
    grpc: Vec<&'static str>,
}

impl RetryOn {
    fn parse(s: &str) -> Self {
        let mut r = RetryOn {
            any_5xx: false,
            gateway: false,
            reset: false,
            connect: false,
            retriable_4xx: false,
            codes: vec![],
            grpc: vec![],
        };
        for tok in s.split(',').map(str::trim) {
            match tok {
                "5xx" => r.any_5xx = true,
                "gateway-error" => r.gateway = true,
                "reset" => r.reset = true,
                "connect-failure" | "refused-stream" => r.connect = true,
                "retriable-4xx" => r.retriable_4xx = true,
                // Istio sets 503 as the retriable status code.
                "retriable-status-codes" => r.codes.push(503),
                "cancelled" => r.grpc.push("1"),
                "deadline-exceeded" => r.grpc.push("4"),
                "resource-exhausted" => r.grpc.push("8"),
                "internal" => r.grpc.push("13"),
                "unavailable" => r.grpc.push("14"),
                n => {
                    if let Ok(code) = n.parse() {
                        r.codes.push(code)
                    }
                }
            }
        }
        r
    }

    fn retries_response<B>(&self, resp: &Response<B>) -> bool {
        let s = resp.status().as_u16();
        (self.any_5xx && s >= 500)
            || (self.gateway && matches!(s, 502..=504))
            || (self.retriable_4xx && s == 409)
            || self.codes.contains(&s)
            || header_str(resp.headers(), "grpc-status").is_some_and(|g| self.grpc.contains(&g))
    }

    fn retries_error(&self, e: &SendError) -> bool {
        match e {
            SendError::Connect(..) => self.connect || self.any_5xx || self.gateway || self.reset,
            SendError::Reset(_) | SendError::PerTryTimeout(_) => self.any_5xx || self.gateway || self.reset,
        }
    }
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

/// Requests whose framing is ambiguous are refused (request smuggling): both
/// `Content-Length` and `Transfer-Encoding`, or several `Content-Length`s.
fn framing(h: &HeaderMap) -> Result<(), &'static str> {
    let lengths = h.get_all(header::CONTENT_LENGTH).iter().count();
    if lengths > 1 {
        return Err("duplicate Content-Length");
    }
    if lengths == 1 && h.contains_key(header::TRANSFER_ENCODING) {
        return Err("both Content-Length and Transfer-Encoding");
    }
    Ok(())
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "host"] {
        h.remove(n);
    }
}

/// `set`, then `add`, then `remove`, as Envoy orders them.
fn apply(h: &mut HeaderMap, ops: Option<&HeaderOperations>) {
    let Some(ops) = ops else { return };
    let pair = |k: &str, v: &str| Some((HeaderName::from_bytes(k.as_bytes()).ok()?, HeaderValue::from_str(v).ok()?));
    for (k, v) in ops.set.iter().filter_map(|(k, v)| pair(k, v)) {
        h.insert(k, v);
    }
    for (k, v) in ops.add.iter().filter_map(|(k, v)| pair(k, v)) {
        h.append(k, v);
    }
    for k in &ops.remove {
        h.remove(k.as_str());
    }
}

/// Gives the request an `x-request-id` if it has none (the `traceparent` is already this
/// hop's span, set when the request came in).
fn request_id(h: &mut HeaderMap) {
    if !h.contains_key("x-request-id") {
        let id = format!("{:032x}", fastrand::u128(..));
        if let Ok(v) = HeaderValue::from_str(&id) {
            h.insert("x-request-id", v);
        }
    }
}

fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS && req.headers().contains_key("access-control-request-method")
}

fn cors_headers(h: &mut HeaderMap, c: &routing::Cors, origin: &str, preflight: bool) {
    let mut set = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    set("access-control-allow-origin", origin.to_string());
    if c.policy.allow_credentials == Some(true) {
        set("access-control-allow-credentials", "true".into());
    }
    if !c.policy.expose_headers.is_empty() {
        set("access-control-expose-headers", c.policy.expose_headers.join(","));
    }
    if preflight {
        if !c.policy.allow_methods.is_empty() {
            set("access-control-allow-methods", c.policy.allow_methods.join(","));
        }
        if !c.policy.allow_headers.is_empty() {
            set("access-control-allow-headers", c.policy.allow_headers.join(","));
        }
        if let Some(age) = c.policy.max_age.as_deref().and_then(|a| routing::duration(a).ok()) {
            set("access-control-max-age", age.as_secs().to_string());
        }
    }
}

fn hit(percent: f64) -> bool {
    percent >= 100.0 || fastrand::f64() * 100.0 < percent
}

fn is_grpc(h: &HeaderMap) -> bool {
    header_str(h, "content-type").is_some_and(|c| c.starts_with("application/grpc"))
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// `:authority`, else `Host`, else the address the client dialled.
fn authority_of<B>(req: &Request<B>, vip: SocketAddr) -> String {
    req.uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| header_str(req.headers(), "host").map(str::to_string))
        .unwrap_or_else(|| vip.to_string())
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
