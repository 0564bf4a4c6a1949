//! eBPF capture installed by the CNI, for node agents that bring none of their own (Istio's
//! ztunnel). istio-cni writes iptables rules into each ambient pod before handing it to
//! the agent; in this mode `ztunnel cni` enrolls the pod in our kernel programs instead, and
//! the agent needs nothing from us: its 15006 listener is adopted when it opens it (a
//! `sock_ops` listen hook, for processes of the configured proxy cgroups), and its 15001
//! listener learns each connection's destination from `getsockopt(SO_ORIGINAL_DST)`,
//! answered by a `cgroup/getsockopt` program. A pod is captured before its Add is sent, so it
//! never runs unprotected: until the agent listens, its connections are refused.
use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;

use tracing::{info, warn};

use crate::netns::InpodNetns;
use crate::redirect::{Capture, CaptureConfig, CaptureError};

use super::records::PodRecord;

/// Capture settings for `ztunnel cni --ebpf-capture`.
#[derive(Debug, Clone)]
pub struct CniCaptureConfig {
    /// Where and how the kernel programs are installed.
    pub capture: CaptureConfig,
    /// cgroup v2 directories of the node agent's processes (e.g. the ztunnel pod's).
    pub proxy_cgroups: Vec<PathBuf>,
}

/// The installed programs and the pods enrolled in them.
pub(super) struct PodCapture {
    capture: std::sync::Arc<Capture>,
    /// uid → (netns path, netns cookie) of each captured pod.
    captured: BTreeMap<String, (PathBuf, u64)>,
}

impl PodCapture {
    /// Installs (or takes over) the kernel programs and registers the proxy cgroups.
    pub(super) fn install(cfg: CniCaptureConfig) -> Result<Self, CaptureError> {
        let capture = Capture::install(cfg.capture)?;
        for cg in &cfg.proxy_cgroups {
            capture.add_proxy_cgroup(cg)?;
        }
        info!(proxy_cgroups = ?cfg.proxy_cgroups, "eBPF capture installed for the node agent");
        Ok(Self { capture: std::sync::Arc::new(capture), captured: BTreeMap::new() })
    }

    /// Captures every pod in `wanted` (not yet captured, or in a new sandbox) and releases
    /// the captured ones no longer wanted. Returns the pods that could not be captured, with
    /// the reason: they must not be handed to the agent.
    pub(super) fn sync<'a>(&mut self, wanted: impl Iterator<Item = &'a PodRecord>) -> BTreeMap<String, String> {
        let mut failed = BTreeMap::new();
        let mut keep = std::collections::BTreeSet::new();
        for rec in wanted {
            keep.insert(rec.uid.clone());
            if self.captured.get(&rec.uid).is_some_and(|(netns, _)| *netns == rec.netns) {
                continue;
            }
            self.release(&rec.uid);
            match File::open(&rec.netns).and_then(InpodNetns::new) {
                Ok(netns) => match self.capture.enroll_for_proxy(&rec.uid, &netns) {
                    Ok(()) => {
                        info!(uid = %rec.uid, "pod captured");
                        self.captured.insert(rec.uid.clone(), (rec.netns.clone(), netns.cookie()));
                    }
                    Err(e) => {
                        warn!(uid = %rec.uid, error = %e, "cannot capture pod");
                        failed.insert(rec.uid.clone(), format!("installing capture: {e}"));
                    }
                },
                Err(e) => {
                    failed.insert(rec.uid.clone(), format!("opening netns {}: {e}", rec.netns.display()));
                }
            }
        }
        let gone: Vec<String> = self.captured.keys().filter(|u| !keep.contains(*u)).cloned().collect();
        for uid in gone {
            self.release(&uid);
        }
        failed
    }

    fn release(&mut self, uid: &str) {
        if let Some((_, cookie)) = self.captured.remove(uid) {
            match self.capture.unenroll(uid, cookie) {
                Ok(()) => info!(%uid, "pod capture removed"),
                Err(e) => warn!(%uid, error = %e, "removing pod capture"),
            }
        }
    }

    /// The installed programs (for their counters).
    pub(super) fn capture(&self) -> std::sync::Arc<Capture> {
        self.capture.clone()
    }
}
