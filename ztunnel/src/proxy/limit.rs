//! Caps on concurrent connections per pod and listener. One agent serves every pod on the
//! node from one process, so without a cap a flood against one pod (or a connection that
//! loops) takes every fd and starves the others. At the cap a new connection is reset at
//! once and counted; the pod's other listeners and every other pod keep serving.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Resource limits of the data path, passed down from the node configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent connections one pod may hold on each of its listeners (outbound 15001,
    /// inbound 15006, HBONE 15008 counted separately, so inbound floods cannot block the
    /// pod's own outbound traffic).
    pub connections_per_pod_listener: usize,
    /// Of those, how many one remote address may hold, so a single peer cannot take a
    /// pod's whole allowance.
    pub connections_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { connections_per_pod_listener: 4096, connections_per_peer: 1024 }
    }
}

/// The live count of one pod listener's connections, in total and per remote address.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    per_peer: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer_max: usize,
}

/// A held connection slot; returns itself (total and per peer) when dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    peer: IpAddr,
    per_peer: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds its maximum of connections.
    Listener,
    /// This remote address holds its maximum.
    Peer,
}

impl Refusal {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Listener => "pod",
            Refusal::Peer => "peer",
        }
    }
}

impl ConnectionLimit {
    /// A limit of `max` concurrent connections, at most `peer_max` of them from one
    /// address (both at least 1).
    pub fn new(max: usize, peer_max: usize) -> Self {
        ConnectionLimit {
            slots: Arc::new(Semaphore::new(max.max(1))),
            per_peer: Arc::default(),
            peer_max: peer_max.max(1),
        }
    }

    /// A slot for one more connection from `peer`, held until the connection ends.
    pub fn try_acquire(&self, peer: IpAddr) -> Result<Slot, Refusal> {
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| Refusal::Listener)?;
        let mut m = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(peer).or_default();
        if *n >= self.peer_max {
            return Err(Refusal::Peer);
        }
        *n += 1;
        Ok(Slot { _permit: permit, peer, per_peer: self.per_peer.clone() })
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
        let (n, p) = (limits.connections_per_pod_listener, limits.connections_per_peer);
        PodLimits {
            // Every outbound connection comes from the pod's own loopback: no per-peer share.
            outbound: ConnectionLimit::new(n, n),
            inbound_passthrough: ConnectionLimit::new(n, p),
            inbound_hbone: ConnectionLimit::new(n, p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_limit_refuses_past_its_cap_and_frees_a_slot_when_a_connection_ends() {
        let l = ConnectionLimit::new(2, 10);
        let a = l.try_acquire(A).expect("first");
        let _b = l.try_acquire(B).expect("second");
        assert_eq!(l.try_acquire(B).unwrap_err(), Refusal::Listener, "third admitted past a cap of 2");
        drop(a);
        assert!(l.try_acquire(A).is_ok(), "slot not returned when a connection ended");
    }

    #[test]
    fn one_peer_cannot_take_more_than_its_share() {
        let l = ConnectionLimit::new(10, 2);
        let _a1 = l.try_acquire(A).unwrap();
        let a2 = l.try_acquire(A).unwrap();
        assert_eq!(l.try_acquire(A).unwrap_err(), Refusal::Peer);
        assert!(l.try_acquire(B).is_ok(), "another peer refused");
        drop(a2);
        assert!(l.try_acquire(A).is_ok(), "peer slot not returned");
    }
}
