//! The HBONE server: accepts CONNECT streams on an mTLS h2 connection, lets a handler decide
//! (connect upstream, deny, fail), and splices accepted tunnels to their upstream.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, debug_span, info, Instrument};

use super::copy::{copy_chunks, CopyStats, Plain};
use super::stream::HboneStream;
use super::{keepalive, H2Config, KeepaliveError};
use crate::identity::Identity;
use crate::tls::{self, VerifyError};

/// Why serving a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TLS peer has no usable identity (should have been refused by the verifier).
    #[error("peer identity unavailable: {0}")]
    PeerIdentity(#[from] VerifyError),
    /// The h2 handshake or connection failed.
    #[error("h2 connection failed: {0}")]
    H2(#[from] h2::Error),
    /// The client stopped answering keepalive PINGs.
    #[error(transparent)]
    Keepalive(#[from] KeepaliveError),
    /// The client sent no h2 preface and SETTINGS within the handshake timeout.
    #[error("no HTTP/2 preface within {0:?}")]
    HandshakeTimeout(std::time::Duration),
}

/// The `Forwarded: for=` value of a request: the original client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardedFor {
    /// Original source IP.
    pub ip: IpAddr,
    /// Original source port, when the sender included it.
    pub port: Option<u16>,
}

/// A parsed CONNECT request, everything policy and upstream selection need.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The target `ip:port` from `:authority`.
    pub authority: SocketAddr,
    /// The original client address from `forwarded`, if sent.
    pub forwarded_for: Option<ForwardedFor>,
    /// The `baggage` header (workload metadata of the source).
    pub baggage: Option<String>,
    /// The W3C `traceparent` header.
    pub traceparent: Option<String>,
    /// The mTLS-authenticated identity of the peer.
    pub peer: Identity,
    /// All request headers, for anything else a handler wants.
    pub headers: HeaderMap,
}

/// A handler's refusal, mapped to the HBONE status codes.
#[derive(Debug, thiserror::Error)]
pub enum ConnectRejection {
    /// The target is not one this server may serve (not local, a proxy port): 400.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Policy denies the connection: 401.
    #[error("denied: {0}")]
    Denied(String),
    /// The upstream could not be reached: 503.
    #[error("upstream connect failed: {0}")]
    UpstreamFailed(String),
}

/// What happened to one accepted tunnel, for metrics and access logs.
#[derive(Debug)]
pub struct StreamSummary {
    /// Target of the tunnel.
    pub authority: SocketAddr,
    /// Peer identity.
    pub peer: Identity,
    /// Bytes each way (a = client tunnel, b = upstream), or the error that ended the copy.
    pub result: io::Result<CopyStats>,
    /// Time from accept to end of the copy.
    pub duration: std::time::Duration,
}

/// Decides each CONNECT: returns a connected upstream or a rejection. Closures
/// `Fn(ConnectRequest) -> impl Future<Output = Result<U, ConnectRejection>>` implement it.
pub trait ConnectHandler: Send + Sync + 'static {
    /// The upstream byte stream the tunnel is spliced to.
    type Upstream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Authorizes and connects the request.
    fn connect(&self, req: ConnectRequest) -> impl Future<Output = Result<Self::Upstream, ConnectRejection>> + Send;

    /// Called when an accepted tunnel ends.
    fn stream_ended(&self, _summary: StreamSummary) {}
}

impl<F, Fut, U> ConnectHandler for F
where
    F: Fn(ConnectRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<U, ConnectRejection>> + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Upstream = U;

    fn connect(&self, req: ConnectRequest) -> impl Future<Output = Result<U, ConnectRejection>> + Send {
        self(req)
    }
}

/// Decides each CONNECT and then serves the tunnel itself, for servers that speak a protocol
/// inside it (the waypoint serves HTTP) instead of splicing it to one upstream. Every
/// [`ConnectHandler`] is one: it splices.
pub trait TunnelHandler: Send + Sync + 'static {
    /// What an accepted CONNECT hands to [`TunnelHandler::serve`].
    type Accepted: Send + 'static;

    /// Authorizes the request; a rejection is answered with its status.
    fn accept(&self, req: ConnectRequest) -> impl Future<Output = Result<Self::Accepted, ConnectRejection>> + Send;

    /// Serves an accepted tunnel (after its 200) until it ends.
    fn serve(&self, accepted: Self::Accepted, tunnel: HboneStream) -> impl Future<Output = ()> + Send;
}

/// What a splicing handler keeps between accepting a tunnel and serving it.
pub struct Spliced<U> {
    authority: SocketAddr,
    peer: Identity,
    started: Instant,
    upstream: U,
}

impl<H: ConnectHandler> TunnelHandler for H {
    type Accepted = Spliced<H::Upstream>;

    async fn accept(&self, req: ConnectRequest) -> Result<Self::Accepted, ConnectRejection> {
        let (authority, peer, started) = (req.authority, req.peer.clone(), Instant::now());
        let upstream = self.connect(req).await?;
        Ok(Spliced { authority, peer, started, upstream })
    }

    async fn serve(&self, a: Self::Accepted, mut tunnel: HboneStream) {
        let Spliced { authority, peer, started, mut upstream } = a;
        let result = copy_chunks(&mut tunnel, &mut Plain(&mut upstream)).await;
        debug!(%authority, ?result, "tunnel finished");
        self.stream_ended(StreamSummary { authority, peer, result, duration: started.elapsed() });
    }
}

/// Serves an accepted HBONE TLS connection until the client closes it.
pub async fn serve_connection<IO, H>(
    tls: tokio_rustls::server::TlsStream<IO>,
    handler: Arc<H>,
    cfg: &H2Config,
) -> Result<(), ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: TunnelHandler,
{
    serve_connection_until(tls, handler, cfg, std::future::pending()).await
}

/// Like [`serve_connection`], but when `drain` completes sends GOAWAY and returns once the
/// in-flight tunnels finish (for graceful shutdown).
pub async fn serve_connection_until<IO, H>(
    tls: tokio_rustls::server::TlsStream<IO>,
    handler: Arc<H>,
    cfg: &H2Config,
    drain: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: TunnelHandler,
{
    let peer = tls::peer_identity(tls.get_ref().1)?;
    let span = debug_span!("hbone_server", peer = %peer);
    async move {
        let handshake = h2::server::Builder::new()
            .initial_window_size(cfg.stream_window)
            .initial_connection_window_size(cfg.connection_window)
            .max_frame_size(cfg.max_frame_size)
            .max_header_list_size(cfg.max_header_list_size)
            .max_concurrent_streams(cfg.max_concurrent_streams)
            .handshake::<_, Bytes>(tls);
        let mut conn = tokio::time::timeout(cfg.handshake_timeout, handshake)
            .await
            .map_err(|_| ServeError::HandshakeTimeout(cfg.handshake_timeout))??;
        let pings = conn.ping_pong().expect("ping_pong is available once");
        let keepalive = keepalive(pings, cfg.keepalive_interval, cfg.keepalive_timeout);
        tokio::pin!(keepalive, drain);
        let mut draining = false;
        // Streams in flight; with none for `idle_timeout`, the connection is closed (GOAWAY).
        let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let idle = tokio::time::sleep(cfg.idle_timeout);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                next = conn.accept() => match next {
                    None => return Ok(()),
                    Some(Ok((req, respond))) => {
                        let (handler, peer) = (handler.clone(), peer.clone());
                        let span = debug_span!("hbone_stream", stream = respond.stream_id().as_u32());
                        let in_flight = StreamGuard::new(active.clone());
                        let fut = handle_stream(req, respond, peer, handler).instrument(span);
                        crate::task::spawn_holding(fut, in_flight);
                    }
                    // Only a NO_ERROR close is clean; a GOAWAY h2 sent because the peer broke the
                    // protocol (e.g. ENHANCE_YOUR_CALM for a header flood) is the peer's error.
                    Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => return Ok(()),
                    Some(Err(e)) => return Err(e.into()),
                },
                e = &mut keepalive => return Err(e.into()),
                () = &mut drain, if !draining => {
                    draining = true;
                    conn.graceful_shutdown();
                }
                () = &mut idle, if !draining => {
                    if active.load(std::sync::atomic::Ordering::Acquire) == 0 {
                        debug!("closing idle HBONE connection");
                        draining = true;
                        conn.graceful_shutdown();
                    } else {
                        idle.as_mut().reset(tokio::time::Instant::now() + cfg.idle_timeout);
                    }
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Counts one stream in flight on a connection until dropped.
struct StreamGuard(Arc<std::sync::atomic::AtomicUsize>);

impl StreamGuard {
    fn new(active: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        active.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        StreamGuard(active)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Why a request is not a valid HBONE CONNECT (answered with 400).
/// Public only so the `hbone_headers` fuzz target (ztunnel/fuzz) can reach it.
pub fn parse_request(req: &Request<h2::RecvStream>, peer: Identity) -> Result<ConnectRequest, String> {
    if req.method() != Method::CONNECT {
        return Err(format!("method {} is not CONNECT", req.method()));
    }
    let authority = req.uri().authority().ok_or("missing :authority")?;
    let authority: SocketAddr =
        authority.as_str().parse().map_err(|_| format!(":authority {authority:?} is not ip:port"))?;
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    Ok(ConnectRequest {
        authority,
        forwarded_for: req.headers().get("forwarded").and_then(|v| v.to_str().ok()).and_then(parse_forwarded_for),
        baggage: header("baggage"),
        traceparent: header("traceparent"),
        peer,
        headers: req.headers().clone(),
    })
}

/// Extracts `for=` from a `Forwarded` header: `for=1.2.3.4`, `for="1.2.3.4:80"`,
/// `for="[::1]:80"` or `for="[::1]"`.
/// Public only so the `hbone_headers` fuzz target (ztunnel/fuzz) can reach it.
pub fn parse_forwarded_for(value: &str) -> Option<ForwardedFor> {
    let first = value.split(',').next()?;
    let raw = first.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then(|| v.trim().trim_matches('"'))
    })?;
    if let Ok(sa) = raw.parse::<SocketAddr>() {
        return Some(ForwardedFor { ip: sa.ip(), port: Some(sa.port()) });
    }
    let ip = raw.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
    Some(ForwardedFor { ip, port: None })
}

fn respond_status(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let resp = Response::builder().status(status).body(()).expect("static response");
    if let Err(e) = respond.send_response(resp, true) {
        debug!(error = %e, %status, "could not send response");
    }
}

async fn handle_stream<H: TunnelHandler>(
    req: Request<h2::RecvStream>,
    respond: SendResponse<Bytes>,
    peer: Identity,
    handler: Arc<H>,
) {
    // Setting up is boxed: the request, its parsed form and the handler's accept state are
    // freed once the tunnel is up, so an idle tunnel's task keeps only the serving state.
    let Some((tunnel, accepted)) = Box::pin(open_tunnel(req, respond, &peer, &*handler)).await else {
        return;
    };
    handler.serve(accepted, tunnel).await;
}

/// Parses the CONNECT, asks the handler to accept it and answers 200, or answers the
/// rejection's status.
async fn open_tunnel<H: TunnelHandler>(
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: &Identity,
    handler: &H,
) -> Option<(HboneStream, H::Accepted)> {
    let parsed = match parse_request(&req, peer.clone()) {
        Ok(p) => p,
        Err(reason) => {
            info!(%reason, "rejecting malformed HBONE request");
            respond_status(respond, StatusCode::BAD_REQUEST);
            return None;
        }
    };
    let authority = parsed.authority;
    let accepted = match handler.accept(parsed).await {
        Ok(u) => u,
        Err(rejection) => {
            let status = match &rejection {
                ConnectRejection::BadRequest(_) => StatusCode::BAD_REQUEST,
                ConnectRejection::Denied(_) => StatusCode::UNAUTHORIZED,
                ConnectRejection::UpstreamFailed(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            info!(%authority, %rejection, "CONNECT rejected");
            respond_status(respond, status);
            return None;
        }
    };
    let send = match respond.send_response(Response::builder().status(StatusCode::OK).body(()).expect("static"), false)
    {
        Ok(send) => send,
        Err(e) => {
            debug!(error = %e, "client went away before 200");
            return None;
        }
    };
    Some((HboneStream::new(send, req.into_body()), accepted))
}
