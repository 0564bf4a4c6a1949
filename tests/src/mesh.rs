//! Running a real `ztunnel node` agent (in-process, on its own tokio runtime) for one
//! node of a mini-cluster, and enrolling pods into it the way the CNI plugin would.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::broadcast;
use ztunnel::enrollment::{EnrollmentClient, WorkloadInfo};
use ztunnel::node::{Node as Agent, NodeConfig};
use ztunnel::proxy::ConnectionRecord;
use ztunnel::redirect::{bpffs_mounted, CaptureConfig, CounterSnapshot, Exclusions};

use crate::{Cluster, Pod};

/// bpffs mount point used for all pins.
pub const BPFFS: &str = "/sys/fs/bpf";

/// A node agent serving one node of a cluster. Dropping it uninstalls everything.
pub struct MeshNode {
    rt: tokio::runtime::Runtime,
    agent: Option<Agent>,
    cfg: NodeConfig,
}

/// Mounts bpffs if needed (setup normally does this); fails loudly when it cannot.
pub fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted(Path::new(BPFFS)) {
        return Ok(());
    }
    crate::cmd::run("mount", &["-t", "bpf", "bpf", BPFFS]).context("mounting bpffs (are you root?)")?;
    Ok(())
}

impl MeshNode {
    /// Starts an agent for `cluster.node(node)`; probes come from the node's bridge address.
    pub fn start(cluster: &Cluster, node: usize, mut exclusions: Exclusions) -> Result<Self> {
        ensure_bpffs()?;
        let n = cluster.node(node);
        exclusions.probe_sources.push(n.gateway4().into());
        exclusions.probe_sources.push(n.gateway6().into());
        let name = format!("{}-node{node}", cluster.prefix());
        let run_dir = PathBuf::from("/run/ztunnel-test").join(&name);
        let cfg = NodeConfig {
            enrollment_socket: run_dir.join("ztunnel.sock"),
            state_dir: run_dir.join("pods"),
            capture: CaptureConfig {
                pin_dir: PathBuf::from(BPFFS).join(&name),
                cgroup: crate::cgroup2_root()?.to_path_buf(),
                exclusions,
            },
        };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let agent = rt.block_on(Agent::start(cfg.clone())).context("starting node agent")?;
        Ok(Self { rt, agent: Some(agent), cfg })
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent running")
    }

    /// A fresh enrollment connection (what the CNI plugin holds).
    pub fn client(&self) -> Result<EnrollmentClient> {
        EnrollmentClient::connect(&self.cfg.enrollment_socket).map_err(|e| anyhow!("connecting to agent: {e}"))
    }

    /// Enrolls a pod; an error ack becomes an error.
    pub fn enroll(&self, pod: &Pod) -> Result<()> {
        let info = WorkloadInfo {
            name: pod.name().into(),
            namespace: "default".into(),
            service_account: pod.name().into(),
        };
        self.client()?
            .add(pod.uid(), info, pod.netns_file())?
            .map_err(|e| anyhow!("agent refused {}: {e}", pod.uid()))
    }

    /// Removes a pod; an error ack becomes an error.
    pub fn remove(&self, pod: &Pod) -> Result<()> {
        self.client()?.del(pod.uid())?.map_err(|e| anyhow!("agent refused Del {}: {e}", pod.uid()))
    }

    /// Kernel counters of this agent's programs.
    pub fn counters(&self) -> CounterSnapshot {
        self.agent().capture().counters().expect("reading counters")
    }

    /// Connection records published by this agent from now on.
    pub fn events(&self) -> broadcast::Receiver<ConnectionRecord> {
        self.agent().connection_events()
    }

    /// Kernel ids of this agent's pinned links.
    pub fn link_ids(&self) -> Vec<u32> {
        self.agent().capture().link_ids()
    }

    /// The agent's pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.cfg.capture.pin_dir
    }

    /// Stops the agent as a crash would (capture stays pinned) and starts a new one on
    /// the same pins and state.
    pub fn restart(&mut self) -> Result<()> {
        drop(self.agent.take());
        // Let the old runtime's aborted tasks close their sockets.
        std::thread::sleep(Duration::from_millis(50));
        let agent = self.rt.block_on(Agent::start(self.cfg.clone())).context("restarting agent")?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Removes everything (as `ztunnel node --uninstall`).
    pub fn uninstall(&mut self) -> Result<()> {
        match self.agent.take() {
            Some(a) => {
                let _guard = self.rt.enter();
                a.uninstall().map_err(|e| anyhow!("uninstall: {e}"))?;
            }
            None => bail!("agent not running"),
        }
        let _ = std::fs::remove_dir_all(self.cfg.enrollment_socket.parent().unwrap_or(Path::new("/nonexistent")));
        Ok(())
    }
}

impl Drop for MeshNode {
    fn drop(&mut self) {
        if self.agent.is_some() {
            if let Err(e) = self.uninstall() {
                eprintln!("cleanup of {}: {e}", self.cfg.capture.pin_dir.display());
            }
        }
    }
}

/// Waits up to `timeout` for a record matching `pred`.
pub fn wait_record(
    rx: &mut broadcast::Receiver<ConnectionRecord>,
    timeout: Duration,
    pred: impl Fn(&ConnectionRecord) -> bool,
) -> Option<ConnectionRecord> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        match rx.try_recv() {
            Ok(r) if pred(&r) => return Some(r),
            Ok(_) => {}
            Err(broadcast::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(10)),
            Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(broadcast::error::TryRecvError::Closed) => return None,
        }
    }
    None
}

/// Removes pins left by agents of test processes that no longer exist.
pub fn sweep_pins() {
    for entry in std::fs::read_dir(BPFFS).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("zt").and_then(|r| r.split('x').next()).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ztunnel::redirect::remove_pinned(&entry.path());
        }
    }
}
