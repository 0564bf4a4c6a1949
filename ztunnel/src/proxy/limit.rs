//! Caps on concurrent connections per pod and listener. One agent serves every pod on the
//! node from one process, so without a cap a flood against one pod (or a connection that
//! loops) takes every fd and starves the others. At the cap a new connection is reset at
//! once and counted; the pod's other listeners and every other pod keep serving.
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Resource limits of the data path, passed down from the node configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent connections one pod may hold on each of its listeners (outbound 15001,
    /// inbound 15006, HBONE 15008 counted separately, so inbound floods cannot block the
    /// pod's own outbound traffic).
    pub connections_per_pod_listener: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { connections_per_pod_listener: 4096 }
    }
}

/// The live count of one pod listener's connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
}

impl ConnectionLimit {
    /// A limit of `max` concurrent connections (at least 1).
    pub fn new(max: usize) -> Self {
        ConnectionLimit { slots: Arc::new(Semaphore::new(max.max(1))) }
    }

    /// A slot for one more connection, held until the connection ends; `None` at the cap.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Connections that can still be accepted.
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

/// One limit per listener of a pod.
#[derive(Debug, Clone)]
pub struct PodLimits {
    pub outbound: ConnectionLimit,
    pub inbound_passthrough: ConnectionLimit,
    pub inbound_hbone: ConnectionLimit,
}

impl PodLimits {
    /// Fresh limits for a pod from the node's settings.
    pub fn new(limits: &Limits) -> Self {
        let n = limits.connections_per_pod_listener;
        PodLimits {
            outbound: ConnectionLimit::new(n),
            inbound_passthrough: ConnectionLimit::new(n),
            inbound_hbone: ConnectionLimit::new(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_refuses_past_its_cap_and_frees_a_slot_when_a_connection_ends() {
        let l = ConnectionLimit::new(2);
        let a = l.try_acquire().expect("first");
        let _b = l.try_acquire().expect("second");
        assert!(l.try_acquire().is_none(), "third admitted past a cap of 2");
        drop(a);
        assert!(l.try_acquire().is_some(), "slot not returned when a connection ended");
    }
}
