//! `ztunnel node`: the per-node agent. Takes pods over the enrollment socket, installs
//! capture for them, and runs each pod's in-pod proxy listeners.
mod enroll_server;
mod pod;
mod pod_state;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::proxy::ConnectionRecord;
use crate::redirect::{Capture, CaptureConfig, CaptureError};

pub use pod::PodProxy;

/// Everything the node agent needs, passed down from the CLI or a test.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Unix `SOCK_SEQPACKET` path where the CNI plugin enrolls pods.
    pub enrollment_socket: PathBuf,
    /// Regular-filesystem directory for per-pod state (netns cookie, IPs) kept across restarts.
    pub state_dir: PathBuf,
    /// eBPF capture settings.
    pub capture: CaptureConfig,
}

/// Why the node agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("installing capture: {0}")]
    Capture(#[from] CaptureError),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

/// State shared by the enrollment server and the handle.
pub(crate) struct Shared {
    pub capture: Capture,
    pub state_dir: PathBuf,
    pub pods: Mutex<HashMap<String, PodProxy>>,
    /// Uids re-sent since start (for stale detection at SnapshotSent).
    pub seen: Mutex<std::collections::HashSet<String>>,
    pub events: broadcast::Sender<ConnectionRecord>,
}

/// A running node agent. Dropping it stops serving but leaves capture pinned (as a crash
/// or upgrade would); [`Node::uninstall`] removes everything.
pub struct Node {
    shared: Arc<Shared>,
    server: JoinHandle<()>,
    socket_path: PathBuf,
}

impl Node {
    /// Installs capture and starts the enrollment server on the current tokio runtime.
    pub async fn start(cfg: NodeConfig) -> Result<Self, NodeError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| NodeError::Io {
            what: "creating state dir",
            path: cfg.state_dir.clone(),
            source,
        })?;
        let capture = Capture::install(cfg.capture.clone())?;
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            capture,
            state_dir: cfg.state_dir.clone(),
            pods: Mutex::new(HashMap::new()),
            seen: Mutex::new(Default::default()),
            events,
        });
        let listener = enroll_server::bind(&cfg.enrollment_socket).map_err(|source| NodeError::Io {
            what: "binding enrollment socket",
            path: cfg.enrollment_socket.clone(),
            source,
        })?;
        let server = tokio::spawn(enroll_server::serve(listener, shared.clone()));
        tracing::info!(socket = %cfg.enrollment_socket.display(), "node agent ready");
        Ok(Self { shared, server, socket_path: cfg.enrollment_socket })
    }

    /// Subscribes to per-connection records (the access log as data).
    pub fn connection_events(&self) -> broadcast::Receiver<ConnectionRecord> {
        self.shared.events.subscribe()
    }

    /// The installed capture (counters, link ids).
    pub fn capture(&self) -> &Capture {
        &self.shared.capture
    }

    /// Uids of the pods this agent currently serves.
    pub fn pods(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shared.pods.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        v.sort();
        v
    }

    /// Removes every pod's capture, all programs, links, pins and state.
    pub fn uninstall(self) -> Result<(), NodeError> {
        self.server.abort();
        let _ = std::fs::remove_file(&self.socket_path);
        let shared = &self.shared;
        // Detach and clear the kernel side first, then close the pods' listeners.
        for st in pod_state::load_all(&shared.state_dir) {
            let _ = shared.capture.unenroll(&st.uid, st.netns_cookie, &st.ips);
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
        self.server.abort();
        let _ = std::fs::remove_file(&self.socket_path);
    }
}
