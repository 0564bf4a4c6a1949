//! The pods this agent serves, by IP. The HBONE pool needs it to dial from the right pod's
//! netns (in-pod mode), and the same-node fast path needs it to tell when a destination is
//! one of our own pods. It lives with the proxy (not the node wiring) so both can use it
//! without the proxy importing upward.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::PodContext;

/// Enrolled pods by IP: who owns a source (or destination) address on this node.
#[derive(Clone, Default)]
pub struct LocalPods {
    by_ip: Arc<Mutex<HashMap<IpAddr, Arc<PodContext>>>>,
}

impl LocalPods {
    /// Registers a pod under all its IPs.
    pub fn insert(&self, pod: &Arc<PodContext>) {
        let mut m = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        for ip in &pod.ips {
            m.insert(*ip, pod.clone());
        }
    }

    /// Forgets a pod's IPs.
    pub fn remove(&self, ips: &[IpAddr]) {
        let mut m = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        for ip in ips {
            m.remove(ip);
        }
    }

    /// The pod owning `ip`.
    pub fn get(&self, ip: IpAddr) -> Option<Arc<PodContext>> {
        self.by_ip.lock().unwrap_or_else(|e| e.into_inner()).get(&ip).cloned()
    }
}
