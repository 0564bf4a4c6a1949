//! `ztunnel cni`: the node-local side of pod enrollment, in Istio's direction. It serves the
//! ZDS socket (`INPOD_UDS`) that a node agent connects to (ours in `--inpod-uds` mode, or
//! Istio's ztunnel), learns pods from the chained CNI plugin (`ztunnel cni plugin`, run by
//! the container runtime for every sandbox) and which of them are in the mesh from the
//! control plane over delta ADS (HBONE workloads on `NODE_NAME`), and enrolls exactly those.
//!
//! - [`plugin`]: the CNI plugin process (CNI spec env + stdin, result or error JSON on stdout);
//! - [`api`]: the plugin's one-request protocol to this daemon;
//! - `manager`: the single task that reconciles pods × control-plane state × agents;
//! - `agents`: the ZDS server side, one task per connected agent;
//! - `records`: pods kept on disk so a restarted daemon can send the snapshot again;
//! - [`cli`]: the subcommand's flags and entry points.
//!
//! The xDS client is the node agent's own (`crate::xds`), writing into a private
//! [`StateStore`] whose change notifications drive reconciliation.
mod agents;
pub mod api;
pub mod capture;
pub mod cli;
pub mod install;
mod manager;
pub mod plugin;
pub mod records;

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::enrollment::socket::{accept_seqpacket, bind};
use crate::state::StateStore;
use crate::xds::{XdsConfig, XdsStats};

/// Default path of the daemon's plugin socket (the plugin's `daemonSocket` key overrides it).
pub const DEFAULT_PLUGIN_SOCKET: &str = "/var/run/ztunnel/cni-plugin.sock";

/// Everything the daemon needs, from the CLI or a test.
#[derive(Debug, Clone)]
pub struct CniConfig {
    /// The ZDS socket node agents connect to (`INPOD_UDS`).
    pub zds_socket: PathBuf,
    /// The socket the CNI plugin reports pods on.
    pub plugin_socket: PathBuf,
    /// Where pod records are kept across restarts.
    pub state_dir: PathBuf,
    /// The control plane (its `node_name` is this node: only its pods are enrolled).
    pub xds: XdsConfig,
    /// How long a plugin ADD waits for the control plane to know the pod and for the node
    /// agent to enroll it before it is answered (an error when the pod is in the mesh but
    /// could not be enrolled: the pod must not start unprotected).
    pub enroll_wait: Duration,
    /// Install eBPF capture for the pods (for a node agent that brings none, e.g. Istio's
    /// ztunnel); None when the agent captures itself (ours) or istio-cni's iptables do.
    pub capture: Option<capture::CniCaptureConfig>,
}

/// What the daemon knows, for operators and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniStatus {
    /// The control plane's first full state arrived.
    pub synced: bool,
    /// Node agents connected.
    pub agents: usize,
    /// Uids of the pods the plugin reported (and not deleted).
    pub known: Vec<String>,
    /// Uids enrolled on the newest agent.
    pub enrolled: Vec<String>,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("installing eBPF capture: {0}")]
    Capture(#[from] crate::redirect::CaptureError),
}

/// A running daemon. Dropping it stops it and removes its sockets; pod records stay so a
/// new daemon can resend the snapshot.
pub struct CniDaemon {
    cfg: CniConfig,
    tasks: Vec<JoinHandle<()>>,
    status: watch::Receiver<CniStatus>,
    xds: Arc<XdsStats>,
    capture: Option<Arc<crate::redirect::Capture>>,
}

impl CniDaemon {
    /// Loads the pod records, binds both sockets and starts the xDS client and the manager
    /// on the current tokio runtime.
    pub async fn start(cfg: CniConfig) -> Result<Self, CniError> {
        let io = |what: &'static str, path: &PathBuf| {
            let path = path.clone();
            move |source| CniError::Io { what, path, source }
        };
        std::fs::create_dir_all(&cfg.state_dir).map_err(io("creating state dir", &cfg.state_dir))?;
        let zds = bind(&cfg.zds_socket).map_err(io("binding the ZDS socket", &cfg.zds_socket))?;
        let plugin = bind(&cfg.plugin_socket).map_err(io("binding the plugin socket", &cfg.plugin_socket))?;
        let store = Arc::new(StateStore::awaiting_sync(&cfg.xds.node_name));
        let xds = Arc::new(XdsStats::default());
        let (status_tx, status) = watch::channel(CniStatus::default());
        let capture = cfg.capture.clone().map(capture::PodCapture::install).transpose()?;
        let capture_handle = capture.as_ref().map(|c| c.capture());
        let manager = manager::Manager::new(
            manager::ManagerConfig {
                state_dir: cfg.state_dir.clone(),
                zds_socket: cfg.zds_socket.clone(),
                enroll_wait: cfg.enroll_wait,
            },
            store.clone(),
            status_tx,
            capture,
        );
        let (events, rx) = mpsc::channel(64);
        let ids = Arc::new(AtomicU64::new(1));
        let agent_events = events.clone();
        let tasks = vec![
            tokio::spawn(crate::xds::run(cfg.xds.clone(), store, xds.clone())),
            tokio::spawn(manager.run(rx)),
            tokio::spawn(accept_seqpacket(zds, "zds", move |fd| {
                agents::agent_connection(fd, agent_events.clone(), ids.clone())
            })),
            tokio::spawn(accept_seqpacket(plugin, "cni-plugin", move |fd| {
                agents::plugin_connection(fd, events.clone())
            })),
        ];
        tracing::info!(zds = %cfg.zds_socket.display(), plugin = %cfg.plugin_socket.display(), node = %cfg.xds.node_name, "cni daemon ready");
        Ok(Self { cfg, tasks, status, xds, capture: capture_handle })
    }

    /// The current view (pods known and enrolled, agents, sync).
    pub fn status(&self) -> CniStatus {
        self.status.borrow().clone()
    }

    /// Notifies on every status change.
    pub fn watch(&self) -> watch::Receiver<CniStatus> {
        self.status.clone()
    }

    /// The xDS client's counters.
    pub fn xds_stats(&self) -> &Arc<XdsStats> {
        &self.xds
    }

    /// The eBPF capture this daemon installed (`--ebpf-capture`), for its counters.
    pub fn capture(&self) -> Option<&Arc<crate::redirect::Capture>> {
        self.capture.as_ref()
    }

    /// The daemon's settings.
    pub fn config(&self) -> &CniConfig {
        &self.cfg
    }
}

impl Drop for CniDaemon {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.cfg.zds_socket);
        let _ = std::fs::remove_file(&self.cfg.plugin_socket);
    }
}
