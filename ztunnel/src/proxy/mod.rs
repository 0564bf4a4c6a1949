//! The per-pod data path, split by direction like Istio's ztunnel:
//! `outbound` (15001: captured connects from the pod, sent in HBONE to mesh workloads or
//! passed through as TCP), `inbound` (15008: HBONE terminated for the pod) and
//! `inbound_passthrough` (15006: plaintext arriving for the pod). Shared pieces:
//! `socket` (sockets inside the pod netns), `authz` (policy checks that keep watching),
//! `relay` (byte copy + access log + metrics), `connections` (the open ones, for the dump).
pub mod authz;
pub mod connections;
pub mod inbound;
pub mod inbound_passthrough;
pub mod keep_source;
pub mod limit;
pub mod local_pods;
pub mod outbound;
pub mod relay;
pub mod same_node;
pub mod socket;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tracing::warn;

use crate::hbone::ConnectionPool;
use crate::identity::{CertManager, Identity};
use crate::netns::InpodNetns;
use crate::state::{Snapshot, StateStore, Workload, WorkloadProtocol};

pub use local_pods::LocalPods;
pub use relay::{ConnectionRecord, Direction};

/// The pod a proxy instance serves, passed down by the node agent.
#[derive(Debug)]
pub struct PodContext {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub netns: InpodNetns,
    /// The pod's addresses (found inside its netns at enrollment).
    pub ips: Vec<IpAddr>,
    /// The pod's HBONE server TLS config, rebuilt only when its certificate changes.
    pub server_tls: ServerTlsCache,
    /// Concurrent connections left on each of the pod's listeners.
    pub limits: limit::PodLimits,
    /// Set when the app is to see clients' own addresses (the pod's reply routing is in
    /// place): where dials from them are registered. See [`keep_source`].
    pub keep_source: Option<crate::redirect::ProxyDials>,
    /// The agent is configured to keep sources (so a pod without `keep_source` is a
    /// kernel refusal, counted).
    pub wants_source: bool,
}

/// One TLS server config per certificate: building a rustls config (and its verifier) per
/// accepted connection would cost every new HBONE connection for nothing.
#[derive(Debug, Default)]
pub struct ServerTlsCache {
    current: std::sync::Mutex<Option<(String, Arc<rustls::ServerConfig>)>>,
}

impl ServerTlsCache {
    /// The config for `cert`, reusing the cached one while the certificate is the same.
    pub fn get(
        &self,
        cert: &crate::identity::WorkloadCertificate,
    ) -> Result<Arc<rustls::ServerConfig>, crate::tls::TlsError> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((serial, cfg)) = cur.as_ref() {
            if serial == cert.serial() {
                return Ok(cfg.clone());
            }
        }
        let cfg = Arc::new(crate::tls::server_config(cert, cert.roots())?);
        *cur = Some((cert.serial().to_string(), cfg.clone()));
        Ok(cfg)
    }
}

impl PodContext {
    /// The pod's SPIFFE identity in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> Option<Identity> {
        Identity::new(trust_domain, &self.namespace, &self.service_account).ok()
    }

    /// The pod's own address of the same family as `like` (HBONE source address).
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips.iter().find(|i| i.is_ipv4() == like.is_ipv4()).or(self.ips.first()).copied()
    }

    /// The workload record for this pod in `snap` (the caller's snapshot, so the workload
    /// and the policies or endpoints it is used with are of one version): by uid (local
    /// config), or else the Pod workload of this name on this node (istiod's). Never looked
    /// up by IP: a stale entry for a reused address must not lend this pod another
    /// workload's namespace or policies.
    ///
    /// When the snapshot lacks it: None in xDS mode, where the pod's connections must be
    /// refused (a stand-in would carry none of the policies that select the pod, turning an
    /// allow-only policy into allow-all); otherwise a stand-in derived from the enrollment,
    /// so namespace-scoped policies still apply.
    pub fn workload(&self, snap: &Snapshot) -> Option<Arc<Workload>> {
        if let Some(w) = snap.workload_by_uid(&self.uid).or_else(|| snap.pod_workload(&self.namespace, &self.name)) {
            return Some(w);
        }
        (!snap.requires_workload()).then(|| self.stand_in())
    }

    /// The workload as far as the enrollment tells it (for labels when the record is missing).
    pub fn stand_in(&self) -> Arc<Workload> {
        Arc::new(Workload {
            uid: self.uid.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            workload_ips: self.ips.clone(),
            protocol: WorkloadProtocol::Hbone,
            node: String::new(),
            trust_domain: String::new(),
            services: Default::default(),
            authorization_policies: vec![],
            canonical_name: String::new(),
            canonical_revision: String::new(),
            cluster_id: String::new(),
            workload_name: String::new(),
            workload_type: String::new(),
            labels: Default::default(),
            locality: Default::default(),
        })
    }
}

/// What every listener of every pod on a node shares.
#[derive(Clone)]
pub struct MeshContext {
    pub trust_domain: String,
    pub state: Arc<StateStore>,
    pub certs: CertManager,
    pub pool: ConnectionPool,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub events: broadcast::Sender<ConnectionRecord>,
    /// The node's open proxied connections (listed in `/config_dump`).
    pub connections: connections::LiveConnections,
    /// Connection spans (disabled unless the agent was asked for them).
    pub tracer: crate::spans::Tracer,
    /// Per-pod resource limits.
    pub limits: limit::Limits,
    /// Turns true when this agent hands its pods to a successor: HBONE connections then
    /// finish their streams and close (GOAWAY), so peers reconnect to the successor.
    pub draining: tokio::sync::watch::Receiver<bool>,
    /// The pods this agent serves, by IP (HBONE sources, same-node destinations).
    pub local_pods: LocalPods,
    /// Whether a connection between two of [`Self::local_pods`] takes the in-process
    /// path instead of HBONE.
    pub same_node_fast_path: bool,
}

/// One pod's listeners' context.
#[derive(Clone)]
pub struct ProxyContext {
    pub pod: Arc<PodContext>,
    pub mesh: MeshContext,
}

/// Accepts on `listener` forever, handing each connection to `handle` while it holds a
/// slot of `limit`; at the cap a connection is reset at once, counted under `name`, and
/// `on_refused` runs (e.g. to drop kernel state kept for it).
pub(crate) async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    limit: limit::ConnectionLimit,
    metrics: Arc<crate::metrics::Metrics>,
    name: &'static str,
    on_refused: impl Fn(SocketAddr),
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let slot = match limit.try_acquire(canonical(peer).ip()) {
                    Ok(slot) => slot,
                    Err(why) => {
                        metrics.connection_limited(name, why.as_str());
                        warn!(listener = name, peer = %canonical(peer), ?why, "connection limit reached; resetting");
                        on_refused(peer);
                        socket::reset(stream);
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let work = handle(stream, peer);
                crate::task::spawn_holding(work, slot);
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Whether `port` is one of the in-pod proxy's own listeners. A connection aimed at one of
/// them would come straight back into the proxy (each hop dialling the next), so both
/// inbound paths refuse such targets, as Istio's ztunnel does.
pub fn is_proxy_port(port: u16) -> bool {
    use ztunnel_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
    matches!(port, OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | HBONE_PORT)
}

/// A dual-stack listener reports IPv4 peers as `::ffff:a.b.c.d`; show them as IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}
