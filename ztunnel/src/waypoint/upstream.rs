//! The waypoint's way to endpoints: an endpoint is chosen among a service's workloads (a
//! DestinationRule subset narrows them), reached in HBONE as the waypoint's own identity
//! over the shared connection pool (plain TCP for workloads outside the mesh), and spoken to
//! in the client's HTTP version. HTTP/1.1 connections are kept for reuse once their
//! response is done; an HTTP/2 connection carries every request to its endpoint.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::circuit::retires;
use crate::hbone::{ConnectHeaders, ConnectionPool, PoolKey};
use crate::identity::Identity;
use crate::state::{Service, Snapshot, Workload, WorkloadProtocol};

/// A chosen endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub service: Arc<Service>,
    /// Endpoint IP and target port.
    pub addr: SocketAddr,
}

/// Picks an endpoint of `service` on service port `port` whose labels include `subset`'s
/// (round robin), in the family of `like`.
pub fn pick(
    snap: &Snapshot,
    service: &Arc<Service>,
    port: u16,
    like: IpAddr,
    subset: Option<&BTreeMap<String, String>>,
) -> Option<Endpoint> {
    let keep = |w: &Workload| {
        subset.is_none_or(|want| {
            let have = w.subset_labels();
            want.iter().all(|(k, v)| have.get(k) == Some(v))
        })
    };
    let (workload, addr) = snap.service_endpoint(service, like, port, keep)?;
    Some(Endpoint { workload, service: service.clone(), addr })
}

/// Why a request could not be sent (all count as connect failures or resets for retries).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection to the endpoint could be made.
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, String),
    /// The connection broke before a response.
    #[error("upstream reset: {0}")]
    Reset(#[from] hyper::Error),
    /// No response within the route's per-try timeout.
    #[error("no response within the per-try timeout of {0:?}")]
    PerTryTimeout(std::time::Duration),
}

/// One HTTP/2 connection per endpoint, with the requests it has carried.
type SharedH2 = HashMap<SocketAddr, (http2::SendRequest<Full<Bytes>>, u32)>;

/// Idle HTTP/1.1 connections per endpoint, with the requests each has carried.
type IdleH1 = HashMap<SocketAddr, Vec<(http1::SendRequest<Full<Bytes>>, u32)>>;

pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// The waypoint's upstream side: its identity, the HBONE pool and the reusable HTTP clients.
pub struct Upstreams {
    pub identity: Identity,
    pub trust_domain: String,
    pub pool: ConnectionPool,
    h1: Arc<Mutex<IdleH1>>,
    h2: Mutex<SharedH2>,
}

impl Upstreams {
    /// Upstreams sending as `identity` over `pool`.
    pub fn new(identity: Identity, trust_domain: String, pool: ConnectionPool) -> Self {
        Upstreams { identity, trust_domain, pool, h1: Default::default(), h2: Default::default() }
    }

    /// Sends `req` (its URI in the form its version needs) to `ep`, from `local_ip`. A
    /// connection is reused until it has carried `per_connection` requests (the cluster's
    /// `http.maxRequestsPerConnection`; `None`: no limit), then closed once its last
    /// response is done. A new HBONE connection's CONNECT names no client and no trace: it
    /// will carry requests of many clients and traces, each of which says its own in its
    /// headers, and the first one's would otherwise stick to all the others.
    pub async fn send(
        &self,
        ep: &Endpoint,
        req: Request<Full<Bytes>>,
        h2: bool,
        local_ip: IpAddr,
        per_connection: Option<u32>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        if h2 {
            let mut sender = match self.idle_h2(ep.addr, per_connection) {
                Some(s) => s,
                None => {
                    let io = self.dial(ep, local_ip, ConnectHeaders::default()).await?;
                    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                        .await
                        .map_err(|e| SendError::Connect(ep.addr, e.to_string()))?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            debug!(error = %e, "upstream h2 connection ended");
                        }
                    });
                    if !retires(per_connection, 1) {
                        self.h2.lock().expect("h2 clients").insert(ep.addr, (sender.clone(), 1));
                    }
                    sender
                }
            };
            return Ok(sender.send_request(req).await?.map(|b| UpstreamBody { inner: b, park: None, ended: false }));
        }
        let (mut sender, served) = match self.idle_h1(ep.addr) {
            Some(s) => s,
            None => {
                let io = self.dial(ep, local_ip, ConnectHeaders::default()).await?;
                let (sender, conn) =
                    http1::handshake(TokioIo::new(io)).await.map_err(|e| SendError::Connect(ep.addr, e.to_string()))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "upstream HTTP/1.1 connection ended");
                    }
                });
                (sender, 0)
            }
        };
        let resp = sender.send_request(req).await?;
        // Kept for the next request once this response's body has been read; dropping the
        // sender instead closes the connection after this response.
        let park = (!retires(per_connection, served + 1)).then(|| Park {
            idle: self.h1.clone(),
            addr: ep.addr,
            sender,
            served: served + 1,
        });
        // An empty body is read by nobody: it has ended already.
        Ok(resp.map(|inner| UpstreamBody { ended: hyper::body::Body::is_end_stream(&inner), inner, park }))
    }

    fn idle_h1(&self, addr: SocketAddr) -> Option<(http1::SendRequest<Full<Bytes>>, u32)> {
        let mut idle = self.h1.lock().expect("h1 clients");
        let list = idle.get_mut(&addr)?;
        while let Some((s, served)) = list.pop() {
            if s.is_ready() {
                return Some((s, served));
            }
        }
        None
    }

    /// The endpoint's HTTP/2 connection for one more request; it leaves the table (new
    /// requests get a new connection) once it has carried `per_connection`.
    fn idle_h2(&self, addr: SocketAddr, per_connection: Option<u32>) -> Option<http2::SendRequest<Full<Bytes>>> {
        let mut h2 = self.h2.lock().expect("h2 clients");
        match h2.get_mut(&addr) {
            Some((s, served)) if !s.is_closed() => {
                *served += 1;
                let sender = s.clone();
                if retires(per_connection, *served) {
                    h2.remove(&addr);
                }
                Some(sender)
            }
            Some(_) => {
                h2.remove(&addr);
                None
            }
            None => None,
        }
    }

    pub(super) async fn dial(
        &self,
        ep: &Endpoint,
        local_ip: IpAddr,
        headers: ConnectHeaders,
    ) -> Result<Box<dyn Io>, SendError> {
        if ep.workload.protocol != WorkloadProtocol::Hbone {
            let s = tokio::net::TcpStream::connect(ep.addr)
                .await
                .map_err(|e| SendError::Connect(ep.addr, e.to_string()))?;
            let _ = s.set_nodelay(true);
            return Ok(Box::new(s));
        }
        let w = &ep.workload;
        let td = if w.trust_domain.is_empty() { &self.trust_domain } else { &w.trust_domain };
        let dst_identity = Identity::new(td, &w.namespace, &w.service_account)
            .map_err(|e| SendError::Connect(ep.addr, format!("endpoint identity: {e}")))?;
        let dst_alt_identities =
            ep.service.subject_alt_names.iter().filter_map(|san| san.parse::<Identity>().ok()).collect();
        let key = PoolKey {
            src_identity: self.identity.clone(),
            dst_identity,
            dst_alt_identities,
            dst: SocketAddr::new(ep.addr.ip(), ztunnel_common::HBONE_PORT),
            src_ip: local_ip,
        };
        let tunnel =
            self.pool.connect(key, ep.addr, headers).await.map_err(|e| SendError::Connect(ep.addr, e.to_string()))?;
        Ok(Box::new(tunnel))
    }
}

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// An HTTP/1.1 connection to keep once its response is read.
struct Park {
    idle: Arc<Mutex<IdleH1>>,
    addr: SocketAddr,
    sender: http1::SendRequest<Full<Bytes>>,
    served: u32,
}

impl Park {
    /// Back into the idle list: at once when the connection is ready for the next request
    /// (the usual case once its response has been read), else when it becomes ready.
    fn put_back(self) {
        let Park { idle, addr, mut sender, served } = self;
        let keep = move |sender, idle: &Mutex<IdleH1>| {
            let mut idle = idle.lock().expect("h1 clients");
            let list = idle.entry(addr).or_default();
            if list.len() < MAX_IDLE_PER_ENDPOINT {
                list.push((sender, served));
            }
        };
        if sender.is_ready() {
            return keep(sender, &idle);
        }
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                keep(sender, &idle);
            }
        });
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body; an HTTP/1.1 connection goes back to the idle list when
    /// the body has been read to its end (not before: the connection is busy until then, and
    /// a body dropped half-read leaves it unusable, so it is closed).
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        park: Option<Park>,
        ended: bool,
    }

    impl PinnedDrop for UpstreamBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.ended {
                if let Some(p) = this.park.take() {
                    p.put_back();
                }
            }
        }
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => *this.ended = true,
            std::task::Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => *this.ended = true,
            std::task::Poll::Ready(Some(Err(_))) => *this.park = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
