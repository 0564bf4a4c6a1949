//! `ztunnel gateway`: the ingress gateway. It implements the Istio `Gateway` resources whose
//! `selector` matches its labels (`istio: ingressgateway` by default, as Istio's): it listens
//! on each server's port, takes HTTP, HTTPS (`SIMPLE`, certificate from a file or a
//! `kubernetes.io/tls` Secret) and TLS passed through by SNI (`PASSTHROUGH`), routes by the
//! VirtualServices bound to the Gateway (`gateways:`), and sends into the mesh in HBONE as
//! its own identity. The per-request path (routing, faults, retries, mirrors, telemetry,
//! traces) is the waypoint's, entered with [`Front::Ingress`]; only the edge differs:
//! there is no mesh peer, so no mesh policy, and a host no VirtualService names is 404.
//!
//! It also serves the Kubernetes `Gateway` resources of class `istio` in the routes
//! directory ([`k8s`]): their listeners add ports, and the Gateway API routes attached to a
//! listener decide its requests.
pub mod k8s;
mod sni;
mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn, Instrument};

use crate::metrics::Metrics;
use crate::routing::ingress::TlsMode;
use crate::waypoint::http::{Front, Tunnel};
use crate::waypoint::telemetry::TunnelSeries;
use crate::waypoint::{Core, Shared, StartError, WaypointConfig};

pub use sni::{peek_client_hello, Hello};

/// How long a client has to send its ClientHello on a TLS port.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the Gateways in force are compared with the ports listened on.
const RECONCILE_EVERY: Duration = Duration::from_millis(300);

/// How an ingress gateway runs.
#[derive(Clone)]
pub struct GatewayConfig {
    /// Identity, state source, routes directory, tracing and access log, as for a waypoint
    /// (`listen` is unused: the ports come from the Gateway resources).
    pub proxy: WaypointConfig,
    /// This gateway's labels: it implements the Gateways whose selector they match.
    pub labels: BTreeMap<String, String>,
    /// The address the servers' ports are bound on (`0.0.0.0` or `::`).
    pub bind: IpAddr,
}

/// A running ingress gateway; stops when dropped.
pub struct IngressGateway {
    routes: crate::waypoint::routes::Routes,
    listeners: Arc<Mutex<BTreeMap<u16, Listening>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Listening {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for IngressGateway {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for (_, l) in std::mem::take(&mut *self.listeners.lock().unwrap_or_else(|e| e.into_inner())) {
            l.task.abort();
        }
    }
}

impl IngressGateway {
    /// Loads state and routes, gets the gateway's certificate, and starts listening on the
    /// ports of the Gateways it implements (following them as they change).
    pub async fn start(cfg: GatewayConfig, metrics: Arc<Metrics>) -> Result<IngressGateway, StartError> {
        let Core { shared, routes, tasks: mut core_tasks, .. } = Core::start(&cfg.proxy, metrics).await?;
        let listeners = Arc::new(Mutex::new(BTreeMap::new()));
        let edge = Arc::new(Edge { shared, labels: cfg.labels.clone(), tls: tls::Certificates::default() });
        reconcile(&edge, &listeners, cfg.bind).await;
        let (e, l) = (edge.clone(), listeners.clone());
        core_tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(RECONCILE_EVERY).await;
                reconcile(&e, &l, cfg.bind).await;
            }
        }));
        Ok(IngressGateway { routes, listeners, tasks: core_tasks })
    }

    /// A handle on the L7 configuration in force (for the admin dump).
    pub fn routes_handle(&self) -> crate::waypoint::routes::Routes {
        self.routes.clone()
    }

    /// The ports listened on, with their bound addresses.
    pub fn listening(&self) -> Vec<(u16, SocketAddr)> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(p, l)| (*p, l.addr)).collect()
    }
}

/// What every ingress connection shares.
struct Edge {
    shared: Arc<Shared>,
    labels: BTreeMap<String, String>,
    tls: tls::Certificates,
}

/// Listens on every port the selected Gateways' servers name and stops listening on the
/// others. A port that cannot be bound is logged and tried again on the next round.
async fn reconcile(edge: &Arc<Edge>, listeners: &Mutex<BTreeMap<u16, Listening>>, bind: IpAddr) {
    let table = edge.shared.routes.table();
    let mut wanted: BTreeSet<u16> =
        table.ingress.selected(&edge.labels).flat_map(|g| g.servers.iter().map(|s| s.port)).collect();
    wanted.extend(k8s::ports(&table));
    let current: BTreeSet<u16> = listeners.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect();
    for port in current.difference(&wanted) {
        if let Some(l) = listeners.lock().unwrap_or_else(|e| e.into_inner()).remove(port) {
            info!(port, "no Gateway server on this port any more; closing it");
            l.task.abort();
        }
    }
    for port in wanted.difference(&current) {
        let addr = SocketAddr::new(bind, *port);
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                let addr = listener.local_addr().unwrap_or(addr);
                info!(%addr, "ingress listening");
                let task = tokio::spawn(accept(edge.clone(), *port, listener));
                listeners.lock().unwrap_or_else(|e| e.into_inner()).insert(*port, Listening { addr, task });
            }
            Err(e) => warn!(%addr, error = %e, "cannot listen for a Gateway server; retrying"),
        }
    }
}

/// The request context of an ingress connection: the Istio Gateways and the Kubernetes
/// Gateways whose routes apply to it.
fn tunnel(
    edge: &Edge,
    peer: SocketAddr,
    local: SocketAddr,
    gateways: Vec<(String, String)>,
    gateway_api: Vec<(String, String)>,
) -> Arc<Tunnel> {
    let shared = &edge.shared;
    let series = TunnelSeries::ingress(shared.name.clone(), &shared.upstreams.identity, &shared.upstreams.trust_domain);
    Arc::new(Tunnel {
        shared: edge.shared.clone(),
        series: Arc::new(series),
        front: Front::Ingress { gateways: Arc::new(gateways), gateway_api: Arc::new(gateway_api) },
        peer_addr: crate::proxy::canonical(peer),
        local_ip: local.ip(),
        vip: local,
        text: Default::default(),
    })
}

async fn accept(edge: Arc<Edge>, port: u16, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let edge = edge.clone();
        let span = tracing::debug_span!("ingress", %peer, port);
        tokio::spawn(async move { connection(edge, port, stream, peer).await }.instrument(span));
    }
}

/// One client connection: which server of which Gateway it is for (by port, then SNI),
/// then HTTP, HTTPS or a TLS relay.
async fn connection(edge: Arc<Edge>, port: u16, stream: TcpStream, peer: SocketAddr) {
    let table = edge.shared.routes.table();
    let servers: Vec<_> = table
        .ingress
        .selected(&edge.labels)
        .flat_map(|g| g.servers.iter().filter(|s| s.port == port).map(move |s| (g, s)))
        .collect();
    let local = match stream.local_addr() {
        Ok(a) => crate::proxy::canonical(a),
        Err(_) => return,
    };
    let listeners = k8s::on_port(&table, port);
    if servers.is_empty() {
        return k8s::connection(edge, port, stream, peer, local, listeners).await;
    }
    // A port shared with Kubernetes Gateway listeners: their plain-HTTP routes apply to
    // plain HTTP after the Istio Gateways' VirtualServices; TLS belongs to the Istio servers.
    let gateway_api = k8s::http_gateways(&listeners);
    let front = |gateways: Vec<(String, String)>, plain_http: bool| {
        tunnel(&edge, peer, local, gateways, if plain_http { gateway_api.clone() } else { vec![] })
    };
    let names = |gs: &[&crate::routing::ingress::IngressGateway]| {
        gs.iter().map(|g| (g.namespace.clone(), g.name.clone())).collect::<Vec<_>>()
    };
    let plain: Vec<_> = servers.iter().filter(|(_, s)| s.tls.is_none()).map(|(g, _)| *g).collect();
    if servers.iter().all(|(_, s)| s.tls.is_none()) {
        return crate::waypoint::http::serve(front(names(&plain), true), stream).await;
    }
    let sni = match peek_client_hello(&stream, HELLO_TIMEOUT).await {
        Ok(Hello::Tls(sni)) => sni,
        Ok(Hello::NotTls) if !plain.is_empty() => {
            return crate::waypoint::http::serve(front(names(&plain), true), stream).await;
        }
        Ok(Hello::NotTls) => return debug!("not TLS on a TLS port"),
        Err(e) => return debug!(error = %e, "no ClientHello"),
    };
    let host = sni.as_deref().unwrap_or("");
    // The most specific server for the name: an exact host before a wildcard.
    let chosen = servers
        .iter()
        .filter(|(_, s)| s.tls.is_some() && s.serves(host))
        .min_by_key(|(_, s)| s.hosts.iter().all(|h| h.starts_with('*')));
    let Some((g, server)) = chosen else {
        return debug!(sni = host, "no Gateway server for this SNI");
    };
    match server.tls.as_ref() {
        Some(TlsMode::Passthrough) => {
            let found = table
                .routers
                .values()
                .filter(|r| r.bound_to(&g.namespace, &g.name))
                .find_map(|r| r.tls_targets(port, host).map(|t| t.to_vec()));
            let Some(targets) = found else {
                return debug!(sni = host, "no tls route for this SNI");
            };
            let t = front(vec![(g.namespace.clone(), g.name.clone())], false);
            crate::waypoint::tcp::relay_to(&t, &targets, &table, stream).await
        }
        Some(TlsMode::Simple(cred)) => {
            let config = match edge.tls.server_config(cred, &table.ingress.secrets) {
                Ok(c) => c,
                Err(e) => return warn!(error = %e, "no certificate for a Gateway server"),
            };
            let tls = match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
                Ok(t) => t,
                Err(e) => {
                    edge.shared.metrics.tls_handshake_failed(crate::tls::RejectReason::from_io(&e).as_str());
                    return debug!(error = %e, "ingress TLS handshake failed");
                }
            };
            // HTTPS routes are those of the Gateways with a TLS server for this name.
            let gws: Vec<_> = servers
                .iter()
                .filter(|(_, s)| matches!(s.tls, Some(TlsMode::Simple(_))) && s.serves(host))
                .map(|(g, _)| *g)
                .collect();
            crate::waypoint::http::serve(front(names(&gws), false), tls).await
        }
        None => {}
    }
}
