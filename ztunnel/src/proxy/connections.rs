//! The node's open proxied connections, for `/config_dump` (`ztunnel ctl connections`): the
//! access log and the metrics only speak of a connection once it has ended, while an
//! operator chasing a stuck or unexpected connection needs to see it while it is open.
//!
//! Every relayed connection registers here once, in `relay::Metered` (shared by every
//! direction), and holds a [`LiveGuard`] whose drop removes it, so an error or a panic cannot
//! leave a stale entry. The cost is one mutex-protected map insert and remove per
//! connection; bytes are counted with relaxed atomics, never under the lock. The registry
//! is bounded: past its capacity connections are still relayed, only counted as not listed.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::relay::{ConnectionRecord, Direction};
use crate::metrics::ConnectionLabels;

/// Entries kept by default: enough for a busy node's operator view, small enough that a
/// flood of connections cannot make the registry (or a config dump) large.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// The registry of open connections; cheap to clone (all clones share it).
#[derive(Clone)]
pub struct LiveConnections {
    inner: Arc<Inner>,
}

struct Inner {
    capacity: usize,
    next_id: AtomicU64,
    entries: Mutex<HashMap<u64, Arc<Live>>>,
    /// Open connections not listed because the registry was full.
    unlisted_open: AtomicU64,
    /// Connections ever left out because the registry was full.
    unlisted_total: AtomicU64,
}

/// What is known about one open connection when it starts, plus its byte counts so far.
struct Live {
    direction: Direction,
    pod: String,
    src: SocketAddr,
    dst: SocketAddr,
    protocol: &'static str,
    src_identity: Option<String>,
    dst_identity: Option<String>,
    src_workload: Option<String>,
    dst_workload: Option<String>,
    started: SystemTime,
    started_at: Instant,
    /// Bytes from the client towards the upstream.
    sent: AtomicU64,
    /// Bytes from the upstream towards the client.
    received: AtomicU64,
}

/// One open connection as `/config_dump` shows it (`connections`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionEntry {
    pub direction: Direction,
    /// Uid of the enrolled pod whose proxy holds the connection.
    pub pod: String,
    pub src: SocketAddr,
    /// The original destination (as in the access log).
    pub dst: SocketAddr,
    /// `"HBONE"` or `"TCP"`.
    pub protocol: &'static str,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    /// `namespace/name` of the source workload, when known.
    pub src_workload: Option<String>,
    /// `namespace/name` of the destination workload, when known.
    pub dst_workload: Option<String>,
    /// When the connection was relayed, milliseconds since the epoch.
    pub started_unix_ms: u64,
    /// How long it has been open, at the time of the snapshot.
    pub age_ms: u64,
    /// Bytes from the client towards the upstream so far.
    pub bytes_sent: u64,
    /// Bytes from the upstream towards the client so far.
    pub bytes_received: u64,
}

/// Connections the registry could not list because it was full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Overflow {
    /// The registry's capacity.
    pub capacity: usize,
    /// Open now but not listed.
    pub open: u64,
    /// Left out since the agent started.
    pub total: u64,
}

impl Default for LiveConnections {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl LiveConnections {
    /// A registry listing at most `capacity` connections at a time.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                capacity,
                next_id: AtomicU64::new(0),
                entries: Mutex::new(HashMap::new()),
                unlisted_open: AtomicU64::new(0),
                unlisted_total: AtomicU64::new(0),
            }),
        }
    }

    /// Registers a connection that is being relayed now; it is listed until the returned
    /// guard is dropped. Never fails: a full registry only counts the connection.
    pub fn open(&self, rec: &ConnectionRecord, labels: &ConnectionLabels) -> LiveGuard {
        let workload = |ns: &str, name: &str| {
            let known = |s: &str| !s.is_empty() && s != "unknown";
            (known(ns) && known(name)).then(|| format!("{ns}/{name}"))
        };
        let live = Arc::new(Live {
            direction: rec.direction,
            pod: rec.pod.clone(),
            src: rec.src,
            dst: rec.dst,
            protocol: rec.protocol,
            src_identity: rec.src_identity.clone(),
            dst_identity: rec.dst_identity.clone(),
            src_workload: workload(&labels.source_workload_namespace, &labels.source_workload),
            dst_workload: workload(&labels.destination_workload_namespace, &labels.destination_workload),
            started: SystemTime::now(),
            started_at: Instant::now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        });
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let listed = {
            let mut entries = self.inner.entries.lock().unwrap_or_else(|e| e.into_inner());
            (entries.len() < self.inner.capacity).then(|| entries.insert(id, live.clone())).is_some()
        };
        if !listed {
            self.inner.unlisted_open.fetch_add(1, Ordering::Relaxed);
            self.inner.unlisted_total.fetch_add(1, Ordering::Relaxed);
        }
        LiveGuard { live, registry: self.inner.clone(), id: listed.then_some(id) }
    }

    /// The listed connections, oldest first.
    pub fn snapshot(&self) -> Vec<ConnectionEntry> {
        // Only the Arcs are copied under the lock; the data path waits for nothing else.
        let live: Vec<Arc<Live>> =
            self.inner.entries.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut out: Vec<ConnectionEntry> = live.iter().map(|l| l.entry()).collect();
        out.sort_by(|a, b| b.age_ms.cmp(&a.age_ms).then_with(|| a.src.cmp(&b.src)));
        out
    }

    /// How many connections the registry could not list.
    pub fn overflow(&self) -> Overflow {
        Overflow {
            capacity: self.inner.capacity,
            open: self.inner.unlisted_open.load(Ordering::Relaxed),
            total: self.inner.unlisted_total.load(Ordering::Relaxed),
        }
    }
}

impl Live {
    fn entry(&self) -> ConnectionEntry {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        ConnectionEntry {
            direction: self.direction,
            pod: self.pod.clone(),
            src: self.src,
            dst: self.dst,
            protocol: self.protocol,
            src_identity: self.src_identity.clone(),
            dst_identity: self.dst_identity.clone(),
            src_workload: self.src_workload.clone(),
            dst_workload: self.dst_workload.clone(),
            started_unix_ms: self.started.duration_since(UNIX_EPOCH).map(ms).unwrap_or(0),
            age_ms: ms(self.started_at.elapsed()),
            bytes_sent: self.sent.load(Ordering::Relaxed),
            bytes_received: self.received.load(Ordering::Relaxed),
        }
    }
}

/// A connection's place in the registry: counts its bytes, and removes it when dropped.
pub struct LiveGuard {
    live: Arc<Live>,
    registry: Arc<Inner>,
    /// The key it is listed under; `None` when the registry was full.
    id: Option<u64>,
}

impl LiveGuard {
    /// Counts bytes passed from the client towards the upstream.
    pub fn add_sent(&self, n: u64) {
        self.live.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts bytes passed from the upstream towards the client.
    pub fn add_received(&self, n: u64) {
        self.live.received.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes from the client towards the upstream so far.
    pub fn sent(&self) -> u64 {
        self.live.sent.load(Ordering::Relaxed)
    }

    /// Bytes from the upstream towards the client so far.
    pub fn received(&self) -> u64 {
        self.live.received.load(Ordering::Relaxed)
    }

    /// Whether the connection is listed (the registry had room for it).
    pub fn is_listed(&self) -> bool {
        self.id.is_some()
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        match self.id {
            Some(id) => {
                self.registry.entries.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            }
            None => {
                self.registry.unlisted_open.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(port: u16) -> ConnectionRecord {
        ConnectionRecord {
            direction: Direction::Outbound,
            pod: "pod-a".into(),
            src: SocketAddr::from(([10, 0, 0, 1], port)),
            dst: SocketAddr::from(([10, 0, 0, 2], 8080)),
            protocol: "HBONE",
            src_identity: Some("spiffe://cluster.local/ns/default/sa/a".into()),
            dst_identity: Some("spiffe://cluster.local/ns/default/sa/b".into()),
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0,
            error: None,
        }
    }

    fn labels() -> ConnectionLabels {
        ConnectionLabels {
            source_workload: "a".into(),
            source_workload_namespace: "default".into(),
            destination_workload: "unknown".into(),
            destination_workload_namespace: "unknown".into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_open_connection_is_listed_with_what_it_started_with() {
        let reg = LiveConnections::default();
        let _g = reg.open(&record(40000), &labels());
        let snap = reg.snapshot();
        assert_eq!(snap.len(), 1);
        let e = &snap[0];
        assert_eq!((e.direction, e.protocol, e.src.port()), (Direction::Outbound, "HBONE", 40000));
        assert_eq!(e.src_identity.as_deref(), Some("spiffe://cluster.local/ns/default/sa/a"));
        assert_eq!(e.src_workload.as_deref(), Some("default/a"));
        assert_eq!(e.dst_workload, None, "an unknown workload is not shown as `unknown/unknown`");
    }

    #[test]
    fn bytes_counted_through_the_guard_show_while_open() {
        let reg = LiveConnections::default();
        let g = reg.open(&record(40000), &labels());
        g.add_sent(10);
        g.add_received(32);
        g.add_sent(5);
        let e = &reg.snapshot()[0];
        assert_eq!((e.bytes_sent, e.bytes_received), (15, 32));
        assert_eq!((g.sent(), g.received()), (15, 32));
    }

    #[test]
    fn dropping_the_guard_removes_the_connection() {
        let reg = LiveConnections::default();
        let a = reg.open(&record(40000), &labels());
        let b = reg.open(&record(40001), &labels());
        drop(a);
        let snap = reg.snapshot();
        assert_eq!(snap.iter().map(|e| e.src.port()).collect::<Vec<_>>(), vec![40001]);
        drop(b);
        assert!(reg.snapshot().is_empty());
    }

    #[test]
    fn a_panicking_connection_task_still_removes_its_entry() {
        let reg = LiveConnections::default();
        let r = reg.clone();
        let joined = std::thread::spawn(move || {
            let _g = r.open(&record(40000), &labels());
            panic!("connection task failed");
        })
        .join();
        assert!(joined.is_err());
        assert!(reg.snapshot().is_empty());
    }

    #[test]
    fn past_capacity_connections_are_counted_not_listed() {
        let reg = LiveConnections::new(2);
        let listed: Vec<LiveGuard> = (0..2).map(|i| reg.open(&record(40000 + i), &labels())).collect();
        let extra: Vec<LiveGuard> = (2..5).map(|i| reg.open(&record(40000 + i), &labels())).collect();
        assert!(listed.iter().all(LiveGuard::is_listed) && !extra.iter().any(LiveGuard::is_listed));
        assert_eq!(reg.snapshot().len(), 2);
        assert_eq!(reg.overflow(), Overflow { capacity: 2, open: 3, total: 3 });
    }

    #[test]
    fn unlisted_connections_leave_the_open_count_when_they_close() {
        let reg = LiveConnections::new(1);
        let _listed = reg.open(&record(40000), &labels());
        let extra = reg.open(&record(40001), &labels());
        drop(extra);
        assert_eq!(reg.overflow(), Overflow { capacity: 1, open: 0, total: 1 });
    }

    #[test]
    fn a_freed_place_is_used_by_the_next_connection() {
        let reg = LiveConnections::new(1);
        let first = reg.open(&record(40000), &labels());
        drop(first);
        assert!(reg.open(&record(40001), &labels()).is_listed());
    }
}
