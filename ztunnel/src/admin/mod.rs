//! Operator HTTP endpoints: admin (`/config_dump`, `/logging`, `/quitquitquit`), Prometheus
//! (`/metrics`, `/stats/prometheus`) and readiness (`/healthz/ready`), on Istio's ports.
//!
//! They run on a dedicated OS thread with its own current-thread tokio runtime, so a slow
//! scrape or config dump never competes with the data path's runtime, and a busy data path
//! never makes the readiness probe time out.

mod logging;

pub use logging::{directive_enables, LogControl, LogLevelError};

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::metrics::{self, Metrics};

/// Largest request body read (and discarded); the endpoints take parameters in the query.
const MAX_BODY: usize = 64 * 1024;
/// Concurrent connections per listener; more wait in the kernel backlog.
const MAX_CONNECTIONS: usize = 64;
/// Slow clients lose their connection instead of pinning a slot.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the three operator listeners bind; [`Default`] is Istio's layout (admin on
/// localhost only, since it can stop the process and reveal config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// `/config_dump`, `/logging`, `/quitquitquit` (default `127.0.0.1:15000`).
    pub admin_addr: SocketAddr,
    /// `/metrics`, `/stats/prometheus` (default `[::]:15020`).
    pub metrics_addr: SocketAddr,
    /// `/healthz/ready` for the kubelet probe (default `[::]:15021`).
    pub readiness_addr: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            admin_addr: "127.0.0.1:15000".parse().expect("valid"),
            metrics_addr: "[::]:15020".parse().expect("valid"),
            readiness_addr: "[::]:15021".parse().expect("valid"),
        }
    }
}

/// Produces the `/config_dump` document on demand (called on the admin thread).
pub type DumpFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;
/// Backs `/shortcut`: `None` reads the sockmap shortcut's state, `Some(on)` flips its kill
/// switch; either way the state after, as JSON, or why it could not be changed.
pub type SwitchFn = Arc<dyn Fn(Option<bool>) -> Result<serde_json::Value, String> + Send + Sync>;
/// Called by `POST /quitquitquit`; it should only signal shutdown (not block, and not drop the
/// [`AdminServer`] synchronously), since it runs on the admin thread.
pub type QuitFn = Arc<dyn Fn() + Send + Sync>;

/// The running operator endpoints; dropping it stops the admin thread and waits for it.
pub struct AdminServer {
    /// The bound admin address (useful when configured with port 0).
    pub admin_addr: SocketAddr,
    /// The bound metrics address.
    pub metrics_addr: SocketAddr,
    /// The bound readiness address.
    pub readiness_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    shortcut: Arc<std::sync::OnceLock<SwitchFn>>,
}

impl std::fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminServer")
            .field("admin_addr", &self.admin_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("readiness_addr", &self.readiness_addr)
            .finish_non_exhaustive()
    }
}

impl AdminServer {
    /// Serves `GET /shortcut` and `POST /shortcut?enabled=true|false` with `switch` (only a
    /// node agent has a sockmap shortcut; elsewhere the path is not found). Set once.
    pub fn serve_shortcut_switch(&self, switch: SwitchFn) {
        let _ = self.shortcut.set(switch);
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            // Never join ourselves (an `on_quit` that drops the server on the admin thread).
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// Starts the operator endpoints with a record-only `/logging` (the requested level is
/// validated and remembered, but no subscriber is changed). See [`start_with_logging`].
pub fn start(
    cfg: AdminConfig,
    metrics: Arc<Metrics>,
    dump: DumpFn,
    ready: Arc<AtomicBool>,
    on_quit: QuitFn,
) -> std::io::Result<AdminServer> {
    let initial = tracing::level_filters::LevelFilter::current().to_string().to_ascii_lowercase();
    start_with_logging(cfg, metrics, dump, ready, on_quit, Arc::new(LogControl::record_only(initial)))
}

/// Binds all three listeners now (so a taken port is reported to the caller, and port 0
/// resolves to a real port), then serves them on a new `ztunnel-admin` thread. `log` backs
/// `GET/POST /logging`; build it with [`LogControl::from_reload_handle`] for live changes.
pub fn start_with_logging(
    cfg: AdminConfig,
    metrics: Arc<Metrics>,
    dump: DumpFn,
    ready: Arc<AtomicBool>,
    on_quit: QuitFn,
    log: Arc<LogControl>,
) -> std::io::Result<AdminServer> {
    let admin = bind(cfg.admin_addr)?;
    let metrics_l = bind(cfg.metrics_addr)?;
    let readiness = bind(cfg.readiness_addr)?;
    let (admin_addr, metrics_addr, readiness_addr) =
        (admin.local_addr()?, metrics_l.local_addr()?, readiness.local_addr()?);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let listeners = {
        let _guard = rt.enter();
        [
            (Role::Admin, TcpListener::from_std(admin)?),
            (Role::Metrics, TcpListener::from_std(metrics_l)?),
            (Role::Readiness, TcpListener::from_std(readiness)?),
        ]
    };
    let flag = ready.clone();
    metrics.add_gauge_collector(
        "ztunnel_ready",
        "1 when /healthz/ready answers 200 (the process has its configuration), else 0",
        Box::new(move || vec![(vec![], flag.load(Ordering::Acquire) as u64)]),
    );
    let shortcut = Arc::new(std::sync::OnceLock::new());
    let shared = Arc::new(Shared { metrics, dump, ready, on_quit, log, shortcut: shortcut.clone() });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let thread = std::thread::Builder::new().name("ztunnel-admin".into()).spawn(move || {
        rt.block_on(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for (role, listener) in listeners {
                tasks.spawn(serve(role, listener, shared.clone(), shutdown_rx.clone()));
            }
            while tasks.join_next().await.is_some() {}
        });
        // Dropping the runtime here cancels any connection still open.
    })?;
    tracing::info!(%admin_addr, %metrics_addr, %readiness_addr, "admin endpoints listening");
    Ok(AdminServer { admin_addr, metrics_addr, readiness_addr, shutdown, thread: Some(thread), shortcut })
}

/// Binds a non-blocking listener; `[::]` falls back to `0.0.0.0` on hosts without IPv6.
fn bind(addr: SocketAddr) -> std::io::Result<StdTcpListener> {
    let l = match StdTcpListener::bind(addr) {
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() => {
            tracing::debug!(%addr, error = %e, "IPv6 bind failed; falling back to IPv4");
            StdTcpListener::bind((Ipv4Addr::UNSPECIFIED, addr.port())).map_err(|_| e)?
        }
        r => r?,
    };
    l.set_nonblocking(true)?;
    Ok(l)
}

#[derive(Clone, Copy, Debug)]
enum Role {
    Admin,
    Metrics,
    Readiness,
}

struct Shared {
    metrics: Arc<Metrics>,
    dump: DumpFn,
    ready: Arc<AtomicBool>,
    on_quit: QuitFn,
    log: Arc<LogControl>,
    shortcut: Arc<std::sync::OnceLock<SwitchFn>>,
}

async fn serve(role: Role, listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stopped(&mut stop) => return,
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let stream = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // e.g. EMFILE: back off instead of spinning.
                    tracing::warn!(?role, error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(role, &shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_BODY)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(?role, error = %e, "admin connection ended with error");
            }
        });
    }
}

/// Resolves once shutdown was requested (or the [`AdminServer`] is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body.into())
}

async fn handle(role: Role, s: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    // Drain (bounded) so keep-alive stays usable; no endpoint uses the body.
    if Limited::new(body, MAX_BODY).collect().await.is_err() {
        return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    }
    let path = parts.uri.path();
    let m = &parts.method;
    match (role, path) {
        (Role::Admin, "/config_dump") if m == Method::GET => match serde_json::to_string_pretty(&(s.dump)()) {
            Ok(j) => reply(StatusCode::OK, "application/json", j + "\n"),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("config dump failed: {e}\n")),
        },
        (Role::Admin, "/logging") if m == Method::GET => text(StatusCode::OK, s.log.current() + "\n"),
        (Role::Admin, "/logging") if m == Method::POST => {
            let level = query_param(parts.uri.query().unwrap_or(""), "level").unwrap_or_default();
            match s.log.set(&level) {
                Ok(now) if s.log.is_live() => text(StatusCode::OK, now + "\n"),
                Ok(now) => {
                    text(StatusCode::OK, format!("{now}\n(recorded only: no reloadable log filter is installed)\n"))
                }
                Err(LogLevelError::Apply(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, e + "\n"),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (Role::Admin, "/shortcut") if s.shortcut.get().is_some() && (m == Method::GET || m == Method::POST) => {
            let switch = s.shortcut.get().expect("checked");
            let wanted = if m == Method::POST {
                match query_param(parts.uri.query().unwrap_or(""), "enabled").as_deref() {
                    Some("true") => Some(true),
                    Some("false") => Some(false),
                    _ => return text(StatusCode::BAD_REQUEST, "want ?enabled=true or ?enabled=false\n"),
                }
            } else {
                None
            };
            match switch(wanted) {
                Ok(v) => reply(StatusCode::OK, "application/json", v.to_string() + "\n"),
                Err(e) => text(StatusCode::CONFLICT, e + "\n"),
            }
        }
        (Role::Admin, "/quitquitquit") if m == Method::POST => {
            tracing::info!("shutdown requested via /quitquitquit");
            (s.on_quit)();
            text(StatusCode::OK, "OK\n")
        }
        (Role::Metrics, "/metrics" | "/stats/prometheus") if m == Method::GET => {
            reply(StatusCode::OK, metrics::CONTENT_TYPE, s.metrics.encode())
        }
        (Role::Readiness, "/healthz/ready") if m == Method::GET => {
            if s.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (Role::Admin, "/config_dump" | "/logging" | "/quitquitquit")
        | (Role::Metrics, "/metrics" | "/stats/prometheus")
        | (Role::Readiness, "/healthz/ready") => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The percent-decoded value of `key` in a query string (`+` means space).
fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
