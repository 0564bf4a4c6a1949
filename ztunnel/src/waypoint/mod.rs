//! `ztunnel waypoint`: the L7 proxy of the ambient mesh. Node agents send traffic for a
//! service that uses a waypoint (`istio.io/use-waypoint`) to it in HBONE, with the service
//! VIP and port as the CONNECT authority. The waypoint terminates mTLS with its own
//! identity, speaks HTTP/1.1 or HTTP/2 inside each tunnel, enforces L7 authorization,
//! routes each request by the service's VirtualService and sends it to an endpoint in HBONE
//! as its own identity; a tunnel to a port with only TCP routes is relayed by those.
//!
//! - [`routes`]: VirtualServices, DestinationRules and targeted AuthorizationPolicies read
//!   from a YAML directory, each compiled or rejected on its own, last good kept;
//! - [`gateway_routes`]: Gateway API routes (HTTPRoute, GRPCRoute, TCPRoute attached to a
//!   Service or to the waypoint's Gateway), which take precedence over VirtualServices;
//! - [`authz`]: L7 AuthorizationPolicy;
//! - `http`: the per-request path, `send` its attempts, retries and mirrors, `headers` the
//!   header rules; `upstream`: endpoints, HBONE and HTTP client reuse;
//! - [`telemetry`]: Istio's request metrics; [`access_log`]: the per-request line, written
//!   in batches by [`log_writer`].
pub mod access_log;
pub mod authz;
pub mod circuit;
mod framing;
pub mod gateway_routes;
mod headers;
pub(crate) mod http;
pub mod lb;
pub mod log_writer;
pub mod outlier;
mod path;
pub mod routes;
mod send;
pub(crate) mod tcp;
pub mod telemetry;
#[cfg(test)]
mod tests;
mod traffic;
mod upstream;
mod workers;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::hbone::{
    serve_connection, CertManagerTls, ConnectRejection, ConnectRequest, ConnectionPool, H2Config, HboneStream,
    PoolConfig, TcpDialer, TunnelHandler,
};
use crate::identity::{CertManager, CertManagerConfig, CertificateProvider, Identity};
use crate::metrics::Metrics;
use crate::state::{Service, StateStore};
use routes::Routes;
use telemetry::RequestMetrics;
use upstream::Upstreams;

pub use http::{MAX_BODY, MAX_HEADERS};

/// How a waypoint runs.
#[derive(Clone)]
pub struct WaypointConfig {
    /// Where HBONE is accepted (`0.0.0.0:15008` in the waypoint's pod).
    pub listen: SocketAddr,
    /// The waypoint's own identity (its service account).
    pub identity: Identity,
    /// The waypoint's Gateway, `(namespace, name)`: policies targeting it apply to all its traffic.
    pub name: (String, String),
    pub trust_domain: String,
    /// Signs the waypoint's certificate.
    pub ca: Arc<dyn CertificateProvider>,
    /// Where the mesh's workloads and services come from.
    pub state: StateSource,
    /// Directory of VirtualServices, DestinationRules and AuthorizationPolicies (re-read on change).
    pub routes_dir: Option<PathBuf>,
    /// Where request spans are exported (OTLP/HTTP); `None`: not exported, `traceparent` still
    /// carried on with the waypoint's span id.
    pub tracing: Option<crate::spans::TraceConfig>,
    /// Access-log line format (Envoy command operators); `None`: Istio's default.
    pub access_log_format: Option<String>,
    /// Access-log lines as JSON with Istio's default keys (`LOG_FORMAT=json`).
    pub access_log_json: bool,
    /// Serving threads (at least one), each with its own single-threaded runtime accepting on
    /// one shared listener and its own upstream connections, so a request runs start to end on
    /// one thread (Envoy's worker model; see docs/decisions.md). Not read by the ingress
    /// gateway, which serves on the caller's runtime.
    pub workers: usize,
}

/// Where a waypoint learns workloads and services, as a node agent does.
#[derive(Clone)]
pub enum StateSource {
    /// Istio local-config YAML (re-read on change).
    LocalConfig(PathBuf),
    /// Delta ADS from a control plane (istiod or `ztunnel controller`).
    Xds(crate::xds::XdsConfig),
}

/// How long a waypoint on xDS waits for its first state before it starts listening anyway.
const FIRST_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What every connection of an L7 proxy shares.
pub(crate) struct Shared {
    pub(crate) state: Arc<StateStore>,
    pub(crate) routes: Routes,
    pub(crate) upstreams: Upstreams,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) requests: RequestMetrics,
    pub(crate) name: (String, String),
    /// Bounds the mirror copies in flight.
    pub(crate) mirrors: Arc<tokio::sync::Semaphore>,
    /// A server span per request.
    pub(crate) tracer: crate::spans::Tracer,
    /// One line per request.
    pub(crate) access_log: Arc<access_log::AccessLogger>,
    /// Load balancers, outlier state and connection-pool limits per destination cluster
    /// (one for all serving threads: limits hold per proxy).
    pub(crate) traffic: Arc<traffic::Traffic>,
}

impl Shared {
    /// The same proxy for another serving thread: everything shared but the upstream
    /// connections, which belong to the runtime that drives them.
    pub(crate) fn with_pool(&self, pool: ConnectionPool) -> Shared {
        Shared {
            state: self.state.clone(),
            routes: self.routes.clone(),
            upstreams: Upstreams::new(self.upstreams.identity.clone(), self.upstreams.trust_domain.clone(), pool),
            metrics: self.metrics.clone(),
            requests: self.requests.clone(),
            name: self.name.clone(),
            mirrors: self.mirrors.clone(),
            tracer: self.tracer.clone(),
            access_log: self.access_log.clone(),
            traffic: self.traffic.clone(),
        }
    }
}

/// The upstream HBONE pool of one runtime, presenting the proxy's certificate.
pub(crate) fn upstream_pool(certs: &CertManager) -> ConnectionPool {
    ConnectionPool::new(PoolConfig::default(), Arc::new(TcpDialer), Arc::new(CertManagerTls { certs: certs.clone() }))
}

/// A running waypoint; its tasks stop when it is dropped.
pub struct Waypoint {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    routes: Routes,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Serving threads; stopped when dropped.
    _workers: Vec<workers::Worker>,
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Why a waypoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("local config {0}: {1}")]
    LocalConfig(PathBuf, String),
    #[error("listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("certificate for {0}: {1}")]
    Certificate(Identity, String),
    #[error("access log: {0}")]
    AccessLog(#[from] access_log::FormatError),
    #[error("access log writer thread: {0}")]
    AccessLogThread(std::io::Error),
    #[error("tracing: {0}")]
    Tracing(#[from] crate::spans::TraceError),
}

/// What a running L7 proxy (waypoint or ingress gateway) is built from: its shared request
/// context, its certificates, its L7 configuration and the tasks that keep them current.
pub(crate) struct Core {
    pub shared: Arc<Shared>,
    pub certs: CertManager,
    pub routes: Routes,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Waypoint {
    /// Loads the config, gets the waypoint's certificate and starts serving.
    pub async fn start(cfg: WaypointConfig, metrics: Arc<Metrics>) -> Result<Waypoint, StartError> {
        let Core { shared, certs, routes, tasks } = Core::start(&cfg, metrics.clone()).await?;
        let threads = cfg.workers.max(1);
        let (addr, workers) = workers::start(threads, cfg.listen, &shared, &certs, &cfg.identity)
            .await
            .map_err(|e| StartError::Listen(cfg.listen, e))?;
        info!(%addr, identity = %cfg.identity, threads, "waypoint listening");
        Ok(Waypoint { addr, metrics, routes, tasks, _workers: workers })
    }
}

impl Core {
    /// State (local config or xDS), L7 objects, access log, tracer, certificate and HBONE
    /// pool for an L7 proxy described by `cfg` (its `listen` is not used here).
    pub(crate) async fn start(cfg: &WaypointConfig, metrics: Arc<Metrics>) -> Result<Core, StartError> {
        let state = Arc::new(StateStore::new(Default::default()));
        let mut tasks = Vec::new();
        match &cfg.state {
            StateSource::LocalConfig(path) => {
                let loaded = crate::state::load_local_config(path, &state, |e| metrics.config_rejected(e.kind))
                    .map_err(|reason| StartError::LocalConfig(path.clone(), reason))?;
                let m = metrics.clone();
                let on_rejected = move |e: &crate::state::ConfigError| m.config_rejected(e.kind);
                tasks.push(tokio::spawn(crate::state::follow_local_config(
                    path.clone(),
                    state.clone(),
                    loaded,
                    on_rejected,
                )));
            }
            StateSource::Xds(xds) => {
                let stats = Arc::new(crate::xds::XdsStats::default());
                crate::xds::client::register_metrics(&metrics, stats.clone());
                tasks.push(tokio::spawn(crate::xds::run(xds.clone(), state.clone(), stats.clone())));
                let deadline = tokio::time::Instant::now() + FIRST_SYNC_WAIT;
                while !stats.synced.load(std::sync::atomic::Ordering::Acquire) && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                if !stats.synced.load(std::sync::atomic::Ordering::Acquire) {
                    warn!("no state from the control plane yet; serving what arrives");
                }
            }
        }
        let routes = Routes::default();
        // Gateway API routes attach to the mesh's Services: known before the first read, and
        // followed (xDS may deliver them later).
        routes.use_services(gateway_routes::mesh_services(&state.snapshot()));
        if let Some(dir) = &cfg.routes_dir {
            routes.reload(dir, &metrics);
        }
        tasks.push(tokio::spawn(routes.clone().follow_services(state.clone())));
        let access_log =
            Arc::new(access_log::AccessLogger::new(cfg.access_log_format.as_deref(), cfg.access_log_json)?);
        let writer = access_log.writer();
        log_writer::LineWriter::flush_periodically(&writer).map_err(StartError::AccessLogThread)?;
        metrics.register(
            "ztunnel_waypoint_access_log_dropped_lines",
            "Access-log lines lost because stdout could not be written",
            writer.dropped(),
        );
        let tracer = match &cfg.tracing {
            Some(t) => crate::spans::Tracer::otlp(t)?,
            None => crate::spans::Tracer::disabled(),
        };
        let certs = CertManager::new(cfg.ca.clone(), CertManagerConfig::default());
        certs.register_expiry_metric(&metrics);
        certs.fetch(&cfg.identity).await.map_err(|e| StartError::Certificate(cfg.identity.clone(), e.to_string()))?;
        let pool = upstream_pool(&certs);
        let shared = Arc::new(Shared {
            state,
            routes: routes.clone(),
            upstreams: Upstreams::new(cfg.identity.clone(), cfg.trust_domain.clone(), pool),
            requests: RequestMetrics::register(&metrics),
            metrics: metrics.clone(),
            name: cfg.name.clone(),
            mirrors: Arc::new(tokio::sync::Semaphore::new(http::MAX_MIRRORS)),
            tracer,
            access_log,
            traffic: Arc::default(),
        });
        if let Some(dir) = cfg.routes_dir.clone() {
            tasks.push(tokio::spawn(routes.clone().follow(dir, metrics.clone())));
        }
        Ok(Core { shared, certs, routes, tasks })
    }
}

impl Waypoint {
    /// The HBONE listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process metrics (request metrics included).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The L7 configuration in force (for status and tests).
    pub fn routes(&self) -> Arc<routes::RouteTable> {
        self.routes.table()
    }

    /// A handle on the L7 configuration that outlives borrows (for the admin dump).
    pub fn routes_handle(&self) -> Routes {
        self.routes.clone()
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, certs: CertManager, identity: Identity) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // A dual-stack listener reports IPv4 peers as mapped IPv6: canonical, they match workload IPs.
        let local_ip =
            stream.local_addr().map(|a| crate::proxy::canonical(a).ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let (shared, certs, identity) = (shared.clone(), certs.clone(), identity.clone());
        let peer = crate::proxy::canonical(peer);
        let span = tracing::debug_span!("waypoint", %peer);
        tokio::spawn(
            async move {
                let cert = match certs.fetch(&identity).await {
                    Ok(c) => c,
                    Err(e) => return warn!(error = %e, "no certificate"),
                };
                let cfg = match crate::tls::server_config(&cert, cert.roots()) {
                    Ok(c) => Arc::new(c),
                    Err(e) => return warn!(error = %e, "cannot build TLS config"),
                };
                let handshake =
                    tokio::time::timeout(H2Config::default().handshake_timeout, TlsAcceptor::from(cfg).accept(stream));
                let tls = match handshake.await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        let reason = crate::tls::RejectReason::from_io(&e);
                        shared.metrics.tls_handshake_failed(reason.as_str());
                        return debug!(error = %e, "TLS handshake refused");
                    }
                    Err(_) => return debug!("TLS handshake timed out"),
                };
                let handler = Arc::new(Handler { shared, peer, local_ip });
                if let Err(e) = serve_connection(tls, handler, &H2Config::default()).await {
                    debug!(error = %e, "HBONE connection ended");
                }
            }
            .instrument(span),
        );
    }
}

/// Accepts tunnels to service VIPs and serves them.
struct Handler {
    shared: Arc<Shared>,
    peer: SocketAddr,
    local_ip: IpAddr,
}

/// An accepted tunnel, HTTP or TCP.
enum Accepted {
    Http(Arc<http::Tunnel>),
    Tcp(Arc<http::Tunnel>),
}

impl TunnelHandler for Handler {
    type Accepted = Accepted;

    async fn accept(&self, req: ConnectRequest) -> Result<Accepted, ConnectRejection> {
        let vip = req.authority;
        let snap = self.shared.state.snapshot();
        let service: Arc<Service> = snap
            .service_by_vip(vip.ip())
            .ok_or_else(|| ConnectRejection::BadRequest(format!("{vip} is not a service address")))?;
        // Only a port the service declares, of a service that uses this waypoint: the
        // waypoint must not become a way to reach anything its identity may reach.
        if !service.ports.contains_key(&vip.port()) {
            return Err(ConnectRejection::BadRequest(format!(
                "{vip}: port {} is not a port of {}",
                vip.port(),
                service.hostname
            )));
        }
        if !snap.waypoint_of(&service).iter().any(|w| w.workload_ips.contains(&self.local_ip)) {
            return Err(ConnectRejection::BadRequest(format!("{} does not use this waypoint", service.hostname)));
        }
        let table = self.shared.routes.table();
        let waypoint = (self.shared.name.0.as_str(), self.shared.name.1.as_str());
        let tcp = table
            .mesh_route(&service, vip.port(), Some(req.peer.namespace()), waypoint)
            .is_some_and(|r| r.is_tcp(vip.port()));
        if tcp {
            // Raw TCP: the policies' L4 parts decide once, for the whole connection.
            let principal = req.peer.to_string();
            let headers = ::http::HeaderMap::new();
            let facts = authz::RequestFacts {
                principal: Some(principal.strip_prefix("spiffe://").unwrap_or(&principal)),
                namespace: Some(req.peer.namespace()),
                source_ip: self.peer.ip(),
                method: "",
                path: "",
                host: "",
                port: vip.port(),
                headers: &headers,
                http: false,
            };
            let svc = (service.namespace.as_str(), service.name.as_str());
            let wp = (self.shared.name.0.as_str(), self.shared.name.1.as_str());
            let poisoned = table.poisoned_for(svc, wp);
            if let Err(reason) = authz::evaluate(table.policies.values(), poisoned, svc, wp, &facts) {
                self.shared.metrics.policy_denied("waypoint");
                return Err(ConnectRejection::Denied(reason));
            }
        }
        let series = Arc::new(telemetry::TunnelSeries::mesh(&req.peer, &self.shared.upstreams.trust_domain));
        let tunnel = Arc::new(http::Tunnel {
            shared: self.shared.clone(),
            series,
            front: http::Front::Mesh { peer: req.peer, service },
            peer_addr: self.peer,
            local_ip: self.local_ip,
            vip,
            text: Default::default(),
        });
        Ok(if tcp { Accepted::Tcp(tunnel) } else { Accepted::Http(tunnel) })
    }

    async fn serve(&self, accepted: Accepted, tunnel: HboneStream) {
        match accepted {
            Accepted::Http(t) => http::serve(t, tunnel).await,
            Accepted::Tcp(t) => tcp::relay(t, tunnel).await,
        }
    }
}
