//! The outbound HBONE connection pool: shares h2 connections per [`PoolKey`], opens another
//! when one is full, lets concurrent requests for a new key wait for a single dial, and closes
//! connections that stay idle.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, debug_span, info, Instrument};

use super::client::{
    build_request, establish, ClientTlsProvider, ConnectHeaders, DialError, Dialer, HboneError, PoolKey,
};
use super::stream::HboneStream;
use super::{keepalive, H2Config};

/// Pool tuning.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Streams per connection before another connection is opened (Istio: ~100).
    pub max_streams_per_conn: usize,
    /// The last idle connection of a key is closed after this long without streams.
    pub idle_timeout: Duration,
    /// Further idle connections of a key (opened for a burst) are closed after this long
    /// without streams, so a burst's TLS and h2 buffers are given back soon after it ends.
    pub surplus_idle_timeout: Duration,
    /// Limit for dial + TLS + h2 handshakes.
    pub connect_timeout: Duration,
    /// HTTP/2 settings.
    pub h2: H2Config,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(300),
            surplus_idle_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            h2: H2Config::default(),
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Connections successfully established since creation.
    pub connections_opened: u64,
    /// Connections currently open.
    pub live_connections: u64,
    /// Failed dials (each shared by all requests that waited on it).
    pub dial_failures: u64,
    /// Tunnels currently open.
    pub active_streams: u64,
    /// Tunnels successfully opened since creation.
    pub streams_opened: u64,
}

#[derive(Default)]
struct Counters {
    opened: AtomicU64,
    live: AtomicU64,
    dial_failures: AtomicU64,
    active_streams: AtomicU64,
    streams_opened: AtomicU64,
}

type DialOutcome = Option<Result<(), Arc<DialError>>>;

struct PooledConn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
    closed: Arc<AtomicBool>,
}

impl PooledConn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn try_reserve(&self, max: usize) -> bool {
        self.active.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }

    fn release(&self) {
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
struct KeyEntry {
    conns: Vec<Arc<PooledConn>>,
    dialing: Option<watch::Receiver<DialOutcome>>,
}

struct PoolInner {
    cfg: PoolConfig,
    dialer: Arc<dyn Dialer>,
    tls: Arc<dyn ClientTlsProvider>,
    keys: Mutex<HashMap<PoolKey, KeyEntry>>,
    counters: Arc<Counters>,
    next_id: AtomicU64,
}

/// Shared outbound HBONE connections; cheap to clone. Must be created inside a tokio runtime
/// (it spawns the idle reaper).
#[derive(Clone)]
pub struct ConnectionPool {
    inner: Arc<PoolInner>,
}

impl ConnectionPool {
    /// A pool dialing with `dialer` and configuring TLS with `tls`.
    pub fn new(cfg: PoolConfig, dialer: Arc<dyn Dialer>, tls: Arc<dyn ClientTlsProvider>) -> Self {
        let inner = Arc::new(PoolInner {
            cfg,
            dialer,
            tls,
            keys: Mutex::new(HashMap::new()),
            counters: Arc::default(),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(reap_idle(Arc::downgrade(&inner)));
        ConnectionPool { inner }
    }

    /// Opens a tunnel to `target` over a pooled connection for `key`.
    pub async fn connect(
        &self,
        key: PoolKey,
        target: SocketAddr,
        headers: ConnectHeaders,
    ) -> Result<HboneStream, HboneError> {
        let span = debug_span!("hbone_connect", dst = %key.dst, %target, src = %key.src_identity);
        async {
            let request = build_request(target, &headers)?;
            let mut retried = false;
            loop {
                let reservation = self.checkout(&key).await?;
                let conn = reservation.conn.clone();
                match self.send_connect(reservation, request.clone(), target).await {
                    Ok(stream) => return Ok(stream),
                    // The connection died between checkout and use: nothing was sent, retry once.
                    Err((e, true)) if !retried => {
                        debug!(conn = conn.id, error = %e, "pooled connection unusable, retrying");
                        if !matches!(e, HboneError::Stream(ref h) if h.reason() == Some(h2::Reason::REFUSED_STREAM)) {
                            conn.closed.store(true, Ordering::Release);
                        }
                        retried = true;
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        }
        .instrument(span)
        .await
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        PoolStats {
            connections_opened: c.opened.load(Ordering::Relaxed),
            live_connections: c.live.load(Ordering::Relaxed),
            dial_failures: c.dial_failures.load(Ordering::Relaxed),
            active_streams: c.active_streams.load(Ordering::Relaxed),
            streams_opened: c.streams_opened.load(Ordering::Relaxed),
        }
    }

    /// Reserves a stream slot on a connection for `key`, dialing (once, shared) if none has
    /// room. The slot is released if the returned reservation is not turned into a stream.
    async fn checkout(&self, key: &PoolKey) -> Result<Reservation, HboneError> {
        let max = self.inner.cfg.max_streams_per_conn;
        loop {
            let mut outcome = {
                let mut keys = self.inner.keys.lock().unwrap_or_else(|e| e.into_inner());
                let entry = keys.entry(key.clone()).or_default();
                entry.conns.retain(|c| !c.is_closed());
                if let Some(conn) = entry.conns.iter().find(|c| c.try_reserve(max)) {
                    return Ok(Reservation { conn: conn.clone() });
                }
                match &entry.dialing {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        entry.dialing = Some(rx.clone());
                        let span = debug_span!("hbone_dial", dst = %key.dst);
                        tokio::spawn(dial(self.inner.clone(), key.clone(), tx).instrument(span));
                        rx
                    }
                }
            };
            let result = match outcome.wait_for(Option::is_some).await {
                Ok(v) => v.clone().expect("waited for Some"),
                // The dial task vanished (runtime shutdown).
                Err(_) => Err(Arc::new(DialError::Abandoned { dst: key.dst })),
            };
            result.map_err(HboneError::Dial)?;
        }
    }

    /// Sends CONNECT on a reserved slot. The bool says whether the failure happened before
    /// anything reached the server (safe to retry on another connection).
    async fn send_connect(
        &self,
        reservation: Reservation,
        request: http::Request<()>,
        target: SocketAddr,
    ) -> Result<HboneStream, (HboneError, bool)> {
        let conn = &reservation.conn;
        let mut send = conn.send.clone().ready().await.map_err(|e| (e.into(), true))?;
        let (response, stream) = send.send_request(request, false).map_err(|e| (e.into(), true))?;
        let response = response.await.map_err(|e| {
            // Not processed by the server: refused outright, or above the last stream id of its
            // GOAWAY (a draining peer, e.g. an agent handing over to its successor; RFC 9113
            // §6.8 says such streams may be retried). No byte of the client's went through:
            // they are sent only after the 200.
            let unprocessed = e.reason() == Some(h2::Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote());
            (HboneError::Stream(e), unprocessed)
        })?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => return Err((HboneError::Denied { target }, false)),
            StatusCode::SERVICE_UNAVAILABLE => return Err((HboneError::UpstreamFailed { target }, false)),
            StatusCode::BAD_REQUEST => return Err((HboneError::BadRequest { target }, false)),
            status => return Err((HboneError::UnexpectedStatus { target, status }, false)),
        }
        let counters = self.inner.counters.clone();
        counters.streams_opened.fetch_add(1, Ordering::Relaxed);
        counters.active_streams.fetch_add(1, Ordering::Relaxed);
        Ok(HboneStream::new(stream, response.into_body()).with_on_drop(move || {
            counters.active_streams.fetch_sub(1, Ordering::Relaxed);
            drop(reservation);
        }))
    }
}

/// A reserved stream slot on a connection; frees it on drop.
struct Reservation {
    conn: Arc<PooledConn>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.conn.release();
    }
}

/// Dials one connection for `key` and publishes the outcome to every waiter.
async fn dial(inner: Arc<PoolInner>, key: PoolKey, tx: watch::Sender<DialOutcome>) {
    let cfg = &inner.cfg;
    let result = tokio::time::timeout(cfg.connect_timeout, establish(&key, &*inner.dialer, &*inner.tls, &cfg.h2))
        .await
        .unwrap_or(Err(DialError::Timeout { dst: key.dst, after: cfg.connect_timeout }));
    let outcome = match result {
        Ok(est) => {
            let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
            let closed = Arc::new(AtomicBool::new(false));
            spawn_driver(id, est.conn, closed.clone(), inner.counters.clone(), &cfg.h2);
            inner.counters.opened.fetch_add(1, Ordering::Relaxed);
            inner.counters.live.fetch_add(1, Ordering::Relaxed);
            info!(conn = id, dst = %key.dst, src = %key.src_identity, dst_id = %key.dst_identity, "HBONE connection established");
            Ok(Arc::new(PooledConn {
                id,
                send: est.send,
                active: AtomicUsize::new(0),
                idle_since: Mutex::new(Instant::now()),
                closed,
            }))
        }
        Err(e) => {
            info!(error = %e, "HBONE dial failed");
            inner.counters.dial_failures.fetch_add(1, Ordering::Relaxed);
            Err(Arc::new(e))
        }
    };
    let mut keys = inner.keys.lock().unwrap_or_else(|e| e.into_inner());
    let entry = keys.entry(key).or_default();
    entry.dialing = None;
    let published = match outcome {
        Ok(conn) => {
            entry.conns.push(conn);
            Ok(())
        }
        Err(e) => Err(e),
    };
    let _ = tx.send(Some(published));
}

/// Drives an h2 client connection and its keepalive; marks it closed when it ends.
fn spawn_driver(
    id: u64,
    conn: h2::client::Connection<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Bytes>,
    closed: Arc<AtomicBool>,
    counters: Arc<Counters>,
    h2cfg: &H2Config,
) {
    let (interval, timeout) = (h2cfg.keepalive_interval, h2cfg.keepalive_timeout);
    let span = debug_span!("hbone_conn", conn = id);
    tokio::spawn(
        async move {
            let mut conn = conn;
            let pings = conn.ping_pong().expect("ping_pong is available once");
            tokio::select! {
                r = &mut conn => match r {
                    Ok(()) => debug!("HBONE connection closed"),
                    Err(e) => debug!(error = %e, "HBONE connection failed"),
                },
                e = keepalive(pings, interval, timeout) => info!(error = %e, "HBONE connection keepalive failed"),
            }
            closed.store(true, Ordering::Release);
            counters.live.fetch_sub(1, Ordering::Relaxed);
        }
        .instrument(span),
    );
}

/// Periodically drops idle connections: all but the most recently used idle connection of
/// a key after the surplus timeout, that one after the idle timeout. Dropping the last
/// request handle lets h2 close the connection with GOAWAY.
async fn reap_idle(pool: Weak<PoolInner>) {
    let period = match pool.upgrade() {
        Some(p) => (p.cfg.idle_timeout.min(p.cfg.surplus_idle_timeout) / 2).max(Duration::from_millis(10)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = pool.upgrade() else { return };
        let mut keys = inner.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.retain(|_, entry| {
            reap_entry(entry, &inner.cfg);
            !entry.conns.is_empty() || entry.dialing.is_some()
        });
    }
}

/// Closes the idle connections of one key that are past their timeout.
fn reap_entry(entry: &mut KeyEntry, cfg: &PoolConfig) {
    entry.conns.retain(|c| !c.is_closed());
    // How long each connection has been without streams (None: in use).
    let idle_for: Vec<Option<Duration>> = entry
        .conns
        .iter()
        .map(|c| {
            (c.active.load(Ordering::Acquire) == 0)
                .then(|| c.idle_since.lock().unwrap_or_else(|e| e.into_inner()).elapsed())
        })
        .collect();
    // The most recently used idle connection is kept warm for the longer timeout.
    let warm =
        idle_for.iter().enumerate().filter_map(|(i, d)| d.map(|d| (i, d))).min_by_key(|&(_, d)| d).map(|(i, _)| i);
    let mut i = 0;
    entry.conns.retain(|c| {
        let limit = if Some(i) == warm { cfg.idle_timeout } else { cfg.surplus_idle_timeout };
        let close = idle_for[i].is_some_and(|d| d >= limit);
        i += 1;
        if close {
            debug!(conn = c.id, "closing idle HBONE connection");
        }
        !close
    });
}
