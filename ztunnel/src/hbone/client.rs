//! The outbound building blocks: how a pool key is dialed (pluggable, since sockets are made
//! inside pod network namespaces), how TLS is configured for it, and how one CONNECT is sent.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::H2Config;
use crate::identity::{CertError, CertManager, Identity};
use crate::tls::{self, RejectReason, TlsError};

/// What HBONE connections are shared by: the same source and destination identities,
/// destination address and source IP (Istio's pool key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Identity the connection authenticates as.
    pub src_identity: Identity,
    /// Identity the server must prove.
    pub dst_identity: Identity,
    /// Further identities the server may prove instead (the service's `subjectAltNames`).
    pub dst_alt_identities: Vec<Identity>,
    /// The HBONE endpoint (`pod ip:15008` or a waypoint).
    pub dst: SocketAddr,
    /// Source IP the connection is made from (the client pod's).
    pub src_ip: IpAddr,
}

/// The future returned by [`Dialer::dial`].
pub type DialFuture<'a> = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>>;

/// Opens the TCP connection for a pool key (e.g. from inside the source pod's network
/// namespace). Closures `Fn(PoolKey) -> impl Future<Output = io::Result<TcpStream>>` implement it.
pub trait Dialer: Send + Sync + 'static {
    /// Connects to `key.dst`.
    fn dial<'a>(&'a self, key: &'a PoolKey) -> DialFuture<'a>;
}

impl<F, Fut> Dialer for F
where
    F: Fn(PoolKey) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<TcpStream>> + Send + 'static,
{
    fn dial<'a>(&'a self, key: &'a PoolKey) -> DialFuture<'a> {
        Box::pin(self(key.clone()))
    }
}

/// Plain `connect()` from the current network namespace, ignoring `src_ip`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpDialer;

impl Dialer for TcpDialer {
    fn dial<'a>(&'a self, key: &'a PoolKey) -> DialFuture<'a> {
        Box::pin(TcpStream::connect(key.dst))
    }
}

/// The future returned by [`ClientTlsProvider::client_config`].
pub type TlsConfigFuture<'a> = Pin<Box<dyn Future<Output = Result<Arc<ClientConfig>, DialError>> + Send + 'a>>;

/// Supplies the client TLS config for a pool key (certificate of the source, expected server
/// identities).
pub trait ClientTlsProvider: Send + Sync + 'static {
    /// The config for connections of `key`.
    fn client_config<'a>(&'a self, key: &'a PoolKey) -> TlsConfigFuture<'a>;
}

/// Takes the source certificate from a [`CertManager`] and expects exactly the key's
/// destination identity.
#[derive(Clone)]
pub struct CertManagerTls {
    /// Where source certificates come from.
    pub certs: CertManager,
}

impl ClientTlsProvider for CertManagerTls {
    fn client_config<'a>(&'a self, key: &'a PoolKey) -> TlsConfigFuture<'a> {
        Box::pin(async move {
            let cert = self.certs.fetch(&key.src_identity).await?;
            let expected = std::iter::once(&key.dst_identity).chain(&key.dst_alt_identities).cloned().collect();
            Ok(Arc::new(tls::client_config(&cert, cert.roots(), expected)?))
        })
    }
}

/// Why a new HBONE connection could not be established; shared by every request that waited
/// for the same dial.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect failed.
    #[error("TCP connect to {dst} failed: {source}")]
    Connect {
        /// The destination.
        dst: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// The source certificate is unavailable.
    #[error(transparent)]
    Certificate(#[from] CertError),
    /// The TLS config could not be built.
    #[error(transparent)]
    TlsConfig(#[from] TlsError),
    /// The TLS handshake failed (`reason` is metric-ready).
    #[error("TLS handshake with {dst} failed ({}): {source}", reason.as_str())]
    Tls {
        /// The destination.
        dst: SocketAddr,
        /// Classified cause.
        reason: RejectReason,
        /// The handshake error.
        source: io::Error,
    },
    /// The HTTP/2 handshake failed.
    #[error("h2 handshake with {dst} failed: {source}")]
    Handshake {
        /// The destination.
        dst: SocketAddr,
        /// The h2 error.
        source: h2::Error,
    },
    /// The dial task ended without a result (runtime shutting down).
    #[error("dial to {dst} was abandoned")]
    Abandoned {
        /// The destination.
        dst: SocketAddr,
    },
    /// Dial + handshakes took too long.
    #[error("connecting to {dst} timed out after {after:?}")]
    Timeout {
        /// The destination.
        dst: SocketAddr,
        /// The configured limit.
        after: Duration,
    },
}

/// Why [`super::ConnectionPool::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// No connection to the destination could be made.
    #[error(transparent)]
    Dial(Arc<DialError>),
    /// The server's policy denied the tunnel (401).
    #[error("HBONE CONNECT to {target} denied by policy (401)")]
    Denied {
        /// The CONNECT target.
        target: SocketAddr,
    },
    /// The server could not reach the target (503).
    #[error("HBONE server could not reach {target} (503)")]
    UpstreamFailed {
        /// The CONNECT target.
        target: SocketAddr,
    },
    /// The server found the request malformed (400).
    #[error("HBONE server rejected CONNECT to {target} as malformed (400)")]
    BadRequest {
        /// The CONNECT target.
        target: SocketAddr,
    },
    /// Any other status.
    #[error("HBONE CONNECT to {target} answered {status}")]
    UnexpectedStatus {
        /// The CONNECT target.
        target: SocketAddr,
        /// The status.
        status: StatusCode,
    },
    /// A header value cannot be sent.
    #[error("invalid {name} header value: {value:?}")]
    InvalidHeader {
        /// Header name.
        name: &'static str,
        /// The rejected value.
        value: String,
    },
    /// The h2 stream or connection failed mid-request.
    #[error("HBONE stream failed: {0}")]
    Stream(#[from] h2::Error),
}

/// Per-request metadata sent with CONNECT.
#[derive(Debug, Clone, Default)]
pub struct ConnectHeaders {
    /// Original client address, sent as `forwarded: for="ip:port"`.
    pub forwarded_for: Option<SocketAddr>,
    /// Service hostname the client addressed, appended as `;host=<name>` (as Istio does).
    pub forwarded_host: Option<String>,
    /// W3C `baggage` (source workload metadata).
    pub baggage: Option<String>,
    /// W3C `traceparent`.
    pub traceparent: Option<String>,
    /// Any further headers.
    pub extra: HeaderMap,
}

/// The CONNECT request the client sends for `target` with `h` (the inverse of the server's parse).
/// Public only so the `hbone_headers` fuzz target (ztunnel/fuzz) can reach it.
pub fn build_request(target: SocketAddr, h: &ConnectHeaders) -> Result<Request<()>, HboneError> {
    let value = |name: &'static str, v: String| {
        HeaderValue::try_from(v.as_str()).map_err(|_| HboneError::InvalidHeader { name, value: v })
    };
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .version(http::Version::HTTP_2)
        .body(())
        .expect("socket address is a valid authority");
    let headers = req.headers_mut();
    headers.extend(h.extra.clone());
    if let Some(src) = h.forwarded_for {
        let host = h.forwarded_host.as_ref().map(|h| format!(";host={h}")).unwrap_or_default();
        headers.insert("forwarded", value("forwarded", format!("for=\"{src}\"{host}"))?);
    }
    if let Some(b) = &h.baggage {
        headers.insert("baggage", value("baggage", b.clone())?);
    }
    if let Some(t) = &h.traceparent {
        headers.insert("traceparent", value("traceparent", t.clone())?);
    }
    Ok(req)
}

/// An established client connection: the request handle and the task driving it.
pub(crate) struct Established {
    pub send: h2::client::SendRequest<Bytes>,
    pub conn: h2::client::Connection<TlsStream<TcpStream>, Bytes>,
}

/// Dial, TLS and h2 handshakes for one new connection.
pub(crate) async fn establish(
    key: &PoolKey,
    dialer: &dyn Dialer,
    tls: &dyn ClientTlsProvider,
    h2: &H2Config,
) -> Result<Established, DialError> {
    let dst = key.dst;
    let tcp = dialer.dial(key).await.map_err(|source| DialError::Connect { dst, source })?;
    let _ = tcp.set_nodelay(true);
    let cfg = tls.client_config(key).await?;
    let stream = TlsConnector::from(cfg)
        .connect(tls::server_name(dst.ip()), tcp)
        .await
        .map_err(|source| DialError::Tls { dst, reason: RejectReason::from_io(&source), source })?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(h2.stream_window)
        .initial_connection_window_size(h2.connection_window)
        .max_frame_size(h2.max_frame_size)
        .max_header_list_size(h2.max_header_list_size)
        .enable_push(false)
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(|source| DialError::Handshake { dst, source })?;
    Ok(Established { send, conn })
}
