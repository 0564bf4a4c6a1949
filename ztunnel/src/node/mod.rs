//! `ztunnel node`: the per-node agent. Takes pods over enrollment (serving its own socket,
//! or connecting to the CNI's as Istio's ztunnel does), installs
//! capture for them, and runs each pod's in-pod proxy listeners (outbound, inbound HBONE,
//! inbound passthrough), sharing one identity manager, HBONE pool and state store.
mod enroll_server;
mod handoff;
mod mesh;
mod pod;
mod pod_state;
mod zds_client;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::admin::{AdminConfig, AdminServer};
use crate::enrollment::socket::bind;
use crate::identity::CertificateProvider;
use crate::proxy::{ConnectionRecord, MeshContext};
use crate::redirect::{Capture, CaptureConfig, CaptureError};
use crate::state::StateStore;

pub use pod::PodProxy;

/// Everything the node agent needs, passed down from the CLI or a test.
#[derive(Clone)]
pub struct NodeConfig {
    /// Unix `SOCK_SEQPACKET` path this agent serves for enrollment (when `zds_connect` is
    /// `None`): tests, the handover and use without a CNI daemon connect here.
    pub enrollment_socket: PathBuf,
    /// Istio's direction (`INPOD_UDS`): the CNI side serves this socket and the agent
    /// connects to it (retrying while it is absent), sends `ZdsHello`, and takes its
    /// requests. When set, `enrollment_socket` is not served, so the two can share a path.
    pub zds_connect: Option<PathBuf>,
    /// Regular-filesystem directory for per-pod state (netns cookie, IPs) kept across restarts.
    pub state_dir: PathBuf,
    /// eBPF capture settings.
    pub capture: CaptureConfig,
    /// SPIFFE trust domain of this mesh.
    pub trust_domain: String,
    /// Where workload certificates come from.
    pub ca: Arc<dyn CertificateProvider>,
    /// Istio local-config YAML (`{workloads, services, policies}`), re-read when it changes.
    pub local_config: Option<PathBuf>,
    /// A control plane serving delta ADS (`XDS_ADDRESS`); the state then comes from it,
    /// and pods' connections are refused until its first full state arrives.
    pub xds: Option<crate::xds::XdsConfig>,
    /// Admin / metrics / readiness listeners; `None` to run without them.
    pub admin: Option<AdminConfig>,
    /// Per-pod connection caps.
    pub limits: crate::proxy::limit::Limits,
    /// Unix socket where a successor agent takes this agent's pods over (and where this
    /// agent first looks for a predecessor to take them from); `None` disables handover.
    pub handoff_socket: Option<PathBuf>,
    /// Live log-level control for the admin `/logging` endpoint (record-only when `None`).
    pub log_control: Option<Arc<crate::admin::LogControl>>,
    /// Apps see clients' own addresses (Istio's `ENABLE_ORIG_SRC`); off, they see the
    /// proxy's (127.0.0.6 on IPv4, the pod's own address on IPv6).
    pub keep_source: bool,
    /// A span per proxied connection, exported over OTLP (`None`: no connection spans; the
    /// HBONE CONNECT still carries a fresh, unsampled `traceparent`).
    pub connection_spans: Option<crate::spans::TraceConfig>,
    /// Connections between two pods of this agent skip TLS and the extra TCP legs (see
    /// `proxy::same_node`); off, they take HBONE like any other.
    pub same_node_fast_path: bool,
}

/// Why the node agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("tracing: {0}")]
    Tracing(#[from] crate::spans::TraceError),
    #[error("installing capture: {0}")]
    Capture(#[from] CaptureError),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("local config {path}: {reason}")]
    LocalConfig { path: PathBuf, reason: String },
}

/// State shared by the enrollment server and the handle.
pub(crate) struct Shared {
    pub capture: Capture,
    /// See [`NodeConfig::keep_source`].
    pub keep_source: bool,
    pub state_dir: PathBuf,
    pub pods: Mutex<HashMap<String, PodProxy>>,
    /// Uids re-sent since start (for stale detection at SnapshotSent).
    pub seen: Mutex<std::collections::HashSet<String>>,
    pub mesh: MeshContext,
    pub registry: crate::proxy::LocalPods,
    /// Tells HBONE connections to finish (GOAWAY) once the pods are handed over.
    pub drain: tokio::sync::watch::Sender<bool>,
    pub retirement: handoff::Retirement,
    /// The xDS client's counters, when the state comes from a control plane.
    pub xds: Option<Arc<crate::xds::XdsStats>>,
}

/// A running node agent. Dropping it stops serving but leaves capture pinned (as a crash
/// or upgrade would); [`Node::uninstall`] removes everything.
pub struct Node {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    /// The enrollment socket this agent serves (none when it connects to the CNI's).
    socket_path: Option<PathBuf>,
    admin: Option<AdminServer>,
    limits: crate::proxy::limit::Limits,
}

impl Node {
    /// Installs capture and starts the enrollment server on the current tokio runtime.
    pub async fn start(cfg: NodeConfig) -> Result<Self, NodeError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| NodeError::Io {
            what: "creating state dir",
            path: cfg.state_dir.clone(),
            source,
        })?;
        // The channel allocates and fills every slot up front (about 240 bytes each), whether or
        // not anyone subscribes: 4096 slots held 0.95 MB of every agent's idle memory.
        let (events, _) = broadcast::channel(256);
        let registry = crate::proxy::LocalPods::default();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let (drain, draining) = tokio::sync::watch::channel(false);
        let tracer = match &cfg.connection_spans {
            Some(t) => crate::spans::Tracer::otlp(t)?,
            None => crate::spans::Tracer::disabled(),
        };
        let mesh = mesh::mesh_context(&cfg, registry.clone(), metrics, events, draining, tracer);
        // Config before capture and pods: a missing or unreadable file stops the agent
        // before it installs anything, and no pod is ever served with an empty policy set.
        let loaded = match &cfg.local_config {
            Some(path) => Some(
                crate::state::load_local_config(path, &mesh.state, |e| mesh.metrics.config_rejected(e.kind))
                    .map_err(|reason| NodeError::LocalConfig { path: path.clone(), reason })?,
            ),
            None => None,
        };
        let capture = Capture::install(cfg.capture.clone())?;
        let shared = Arc::new(Shared {
            capture,
            keep_source: cfg.keep_source,
            state_dir: cfg.state_dir.clone(),
            pods: Mutex::new(HashMap::new()),
            seen: Mutex::new(Default::default()),
            mesh,
            registry,
            drain,
            retirement: Default::default(),
            xds: cfg.xds.as_ref().map(|_| Arc::default()),
        });
        let mut tasks = vec![];
        if let (Some(xds), Some(stats)) = (cfg.xds.clone(), shared.xds.clone()) {
            tasks.push(tokio::spawn(crate::xds::run(xds, shared.mesh.state.clone(), stats)));
        }
        if let Some(path) = &cfg.handoff_socket {
            // Take the pods of the agent we replace (if one runs) before serving anything.
            match handoff::take(path, &shared) {
                Ok(0) => {}
                Ok(n) => tracing::info!(pods = n, "took over pods from the previous agent"),
                Err(e) => tracing::warn!(error = %e, "taking over from the previous agent failed; pods need a new Add"),
            }
            let listener = bind(path).map_err(|source| NodeError::Io {
                what: "binding handoff socket",
                path: path.clone(),
                source,
            })?;
            tasks.push(tokio::spawn(handoff::serve(listener, shared.clone())));
        }
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let socket_path = match &cfg.zds_connect {
            Some(path) => {
                tasks.push(tokio::spawn(zds_client::run(path.clone(), shared.clone())));
                None
            }
            None => {
                let listener = bind(&cfg.enrollment_socket).map_err(|source| NodeError::Io {
                    what: "binding enrollment socket",
                    path: cfg.enrollment_socket.clone(),
                    source,
                })?;
                tasks.push(tokio::spawn(enroll_server::serve(listener, shared.clone())));
                Some(cfg.enrollment_socket.clone())
            }
        };
        if let (Some(path), Some(loaded)) = (cfg.local_config.clone(), loaded) {
            let metrics = shared.mesh.metrics.clone();
            let on_rejected = move |e: &crate::state::ConfigError| metrics.config_rejected(e.kind);
            tasks.push(tokio::spawn(crate::state::follow_local_config(
                path,
                shared.mesh.state.clone(),
                loaded,
                on_rejected,
            )));
        }
        let admin = match cfg.admin.clone() {
            Some(a) => {
                Some(mesh::start_admin(a, &shared, cfg.log_control.clone(), ready.clone()).map_err(|source| {
                    NodeError::Io { what: "binding admin listeners", path: PathBuf::from("admin"), source }
                })?)
            }
            None => None,
        };
        // Capture installed, first config applied, enrollment served: now ready.
        ready.store(true, std::sync::atomic::Ordering::Release);
        match &cfg.zds_connect {
            Some(path) => tracing::info!(cni_socket = %path.display(), "node agent ready"),
            None => tracing::info!(socket = %cfg.enrollment_socket.display(), "node agent ready"),
        }
        Ok(Self { shared, tasks, socket_path, admin, limits: cfg.limits })
    }

    /// Resolves once a successor has taken this agent's pods and the connections accepted
    /// before that ended, or `deadline` passed; returns how many were still open.
    pub async fn retired(&self, deadline: std::time::Duration) -> usize {
        self.shared.retirement.drained(self.limits.connections_per_pod_listener, deadline).await
    }

    /// Whether a successor has taken this agent's pods.
    pub fn handed_off(&self) -> bool {
        self.shared.retirement.handed_off()
    }

    /// Subscribes to per-connection records (the access log as data).
    pub fn connection_events(&self) -> broadcast::Receiver<ConnectionRecord> {
        self.shared.mesh.events.subscribe()
    }

    /// The installed capture (counters, link ids).
    pub fn capture(&self) -> &Capture {
        &self.shared.capture
    }

    /// The mesh state (workloads, services, policies) this node enforces.
    pub fn state(&self) -> &Arc<StateStore> {
        &self.shared.mesh.state
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.shared.mesh.metrics
    }

    /// Outbound HBONE pool statistics.
    pub fn pool_stats(&self) -> crate::hbone::PoolStats {
        self.shared.mesh.pool.stats()
    }

    /// Bound admin/metrics/readiness addresses, when enabled.
    pub fn admin(&self) -> Option<&AdminServer> {
        self.admin.as_ref()
    }

    /// Uids of the pods this agent currently serves.
    pub fn pods(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shared.pods.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        v.sort();
        v
    }

    /// Removes every pod's capture, all programs, links, pins and state.
    pub fn uninstall(self) -> Result<(), NodeError> {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
        let shared = &self.shared;
        // Detach and clear the kernel side first, then close the pods' listeners.
        for st in pod_state::load_all(&shared.state_dir) {
            let _ = shared.capture.unenroll(&st.uid, st.netns_cookie);
            pod_state::remove(&shared.state_dir, &st.uid);
        }
        shared.pods.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let _ = std::fs::remove_dir(&shared.state_dir);
        shared.capture.uninstall()?;
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // After a handover the path belongs to the successor's socket.
        if let Some(path) = self.socket_path.as_ref().filter(|_| !self.shared.retirement.handed_off()) {
            let _ = std::fs::remove_file(path);
        }
    }
}
