//! Circuit breaking (issue "Traffic policy", DestinationRule `connectionPool`): the limits on
//! connections, pending requests, active requests and active retries, as lock-free counters
//! with RAII permits. This module exists so the limits never block a request and are tested
//! without I/O: a permit is taken with one atomic update or refused at once.
//!
//! # API
//!
//! - [`Breaker::new`]`(&PoolLimits)`: one per cluster (service, subset, port), from
//!   `EffectivePolicy::connection_pool`. Envoy's circuit breakers count per cluster, across
//!   all its endpoints (Istio's doc says "each individual host"; Envoy's thresholds are
//!   cluster-wide), and so do these.
//! - [`Breaker::connection`] (`tcp.maxConnections`), [`Breaker::pending`]
//!   (`http.http1MaxPendingRequests`: requests waiting for a connection), [`Breaker::request`]
//!   (`http.http2MaxRequests`: requests in flight, any HTTP version), [`Breaker::retry`]
//!   (`http.maxRetries`: retries in flight): each `Result<Permit, Overflow>`; the count
//!   drops when the [`Permit`] does.
//! - [`Overflow`]: the caller answers [`Overflow::STATUS`] (503) with response flag
//!   [`Overflow::RESPONSE_FLAG`] (`UO`); for a TCP tunnel, it closes the connection. For HTTP,
//!   Envoy does not fail a request for want of a new connection: it waits (a pending request)
//!   for one to free up, so a caller refused [`Breaker::connection`] queues behind
//!   [`Breaker::pending`] or reuses a connection.
//! - [`retires`]`(max, served)`: whether an upstream connection that has carried `served`
//!   requests must be closed under [`Breaker::max_requests_per_connection`]
//!   (`http.maxRequestsPerConnection`; 1 disables keep-alive).
//! - [`Breaker::usage`]: counts and overflows, for metrics.
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::routing::traffic_policy::PoolLimits;

/// A limited resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    Connections,
    PendingRequests,
    Requests,
    Retries,
}

impl Resource {
    const ALL: [Resource; 4] =
        [Resource::Connections, Resource::PendingRequests, Resource::Requests, Resource::Retries];

    fn slot(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Connections => "connections",
            Resource::PendingRequests => "pending requests",
            Resource::Requests => "requests",
            Resource::Retries => "retries",
        })
    }
}

/// A limit was reached: the request (or connection) is refused, not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    #[error("connection limit {0} reached (connectionPool.tcp.maxConnections)")]
    Connections(u32),
    #[error("pending request limit {0} reached (connectionPool.http.http1MaxPendingRequests)")]
    PendingRequests(u32),
    #[error("active request limit {0} reached (connectionPool.http.http2MaxRequests)")]
    Requests(u32),
    #[error("active retry limit {0} reached (connectionPool.http.maxRetries)")]
    Retries(u32),
}

impl Overflow {
    /// The status the caller answers with.
    pub const STATUS: u16 = 503;
    /// Envoy's response flag for an upstream overflow (`%RESPONSE_FLAGS%`).
    pub const RESPONSE_FLAG: &'static str = "UO";

    /// The resource that overflowed.
    pub fn resource(&self) -> Resource {
        match self {
            Overflow::Connections(_) => Resource::Connections,
            Overflow::PendingRequests(_) => Resource::PendingRequests,
            Overflow::Requests(_) => Resource::Requests,
            Overflow::Retries(_) => Resource::Retries,
        }
    }
}

/// Counts in use and overflows so far, per resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub connections: u32,
    pub pending_requests: u32,
    pub requests: u32,
    pub retries: u32,
    /// Refusals so far, in [`Resource`] order.
    pub overflows: [u64; 4],
}

/// Whether a connection that has carried `served` requests is done under a limit of `max`
/// requests per connection (`None`: unlimited).
pub fn retires(max: Option<u32>, served: u32) -> bool {
    max.is_some_and(|max| served >= max)
}

/// One cluster's circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    limits: [u32; 4],
    max_requests_per_connection: Option<u32>,
    in_use: [AtomicU32; 4],
    overflows: [AtomicU64; 4],
}

/// A unit of a resource in use; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    breaker: Arc<Breaker>,
    resource: Resource,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.breaker.in_use[self.resource.slot()].fetch_sub(1, Ordering::AcqRel);
    }
}

impl Permit {
    /// Which resource it holds.
    pub fn resource(&self) -> Resource {
        self.resource
    }
}

impl Breaker {
    /// A breaker with `limits`' thresholds.
    pub fn new(limits: &PoolLimits) -> Arc<Self> {
        Arc::new(Breaker {
            limits: [limits.max_connections, limits.max_pending_requests, limits.max_requests, limits.max_retries],
            max_requests_per_connection: limits.max_requests_per_connection,
            in_use: Default::default(),
            overflows: Default::default(),
        })
    }

    /// Takes one unit of `resource` if fewer than its limit are in use; never waits.
    pub fn acquire(self: &Arc<Self>, resource: Resource) -> Result<Permit, Overflow> {
        let (i, limit) = (resource.slot(), self.limits[resource.slot()]);
        match self.in_use[i].fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)) {
            Ok(_) => Ok(Permit { breaker: self.clone(), resource }),
            Err(_) => {
                self.overflows[i].fetch_add(1, Ordering::Relaxed);
                Err(match resource {
                    Resource::Connections => Overflow::Connections(limit),
                    Resource::PendingRequests => Overflow::PendingRequests(limit),
                    Resource::Requests => Overflow::Requests(limit),
                    Resource::Retries => Overflow::Retries(limit),
                })
            }
        }
    }

    /// A new upstream connection (`tcp.maxConnections`).
    pub fn connection(self: &Arc<Self>) -> Result<Permit, Overflow> {
        self.acquire(Resource::Connections)
    }

    /// A request waiting for a connection (`http.http1MaxPendingRequests`).
    pub fn pending(self: &Arc<Self>) -> Result<Permit, Overflow> {
        self.acquire(Resource::PendingRequests)
    }

    /// A request in flight (`http.http2MaxRequests`).
    pub fn request(self: &Arc<Self>) -> Result<Permit, Overflow> {
        self.acquire(Resource::Requests)
    }

    /// A retry in flight (`http.maxRetries`); a refused retry is not made, the last
    /// response stands.
    pub fn retry(self: &Arc<Self>) -> Result<Permit, Overflow> {
        self.acquire(Resource::Retries)
    }

    /// `http.maxRequestsPerConnection`, for the upstream connections of this cluster.
    pub fn max_requests_per_connection(&self) -> Option<u32> {
        self.max_requests_per_connection
    }

    /// What is in use and how often each limit refused.
    pub fn usage(&self) -> Usage {
        let n = |r: Resource| self.in_use[r.slot()].load(Ordering::Acquire);
        Usage {
            connections: n(Resource::Connections),
            pending_requests: n(Resource::PendingRequests),
            requests: n(Resource::Requests),
            retries: n(Resource::Retries),
            overflows: Resource::ALL.map(|r| self.overflows[r.slot()].load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(f: impl FnOnce(&mut PoolLimits)) -> Arc<Breaker> {
        let mut l = PoolLimits::default();
        f(&mut l);
        Breaker::new(&l)
    }

    #[test]
    fn connections_overflow_at_max_connections() {
        let b = limits(|l| l.max_connections = 2);
        let held = [b.connection().unwrap(), b.connection().unwrap()];
        assert_eq!(b.connection().unwrap_err(), Overflow::Connections(2));
        assert_eq!(b.usage().connections, 2);
        drop(held);
    }

    #[test]
    fn a_dropped_permit_frees_its_unit() {
        let b = limits(|l| l.max_connections = 1);
        let p = b.connection().unwrap();
        assert!(b.connection().is_err());
        drop(p);
        assert!(b.connection().is_ok());
        assert_eq!(b.usage().connections, 0, "the permit above was dropped at once");
    }

    #[test]
    fn pending_requests_overflow_at_http1_max_pending_requests() {
        let b = limits(|l| l.max_pending_requests = 1);
        let _p = b.pending().unwrap();
        assert_eq!(b.pending().unwrap_err(), Overflow::PendingRequests(1));
    }

    #[test]
    fn requests_overflow_at_http2_max_requests_and_recover() {
        let b = limits(|l| l.max_requests = 3);
        let mut held: Vec<Permit> = (0..3).map(|_| b.request().unwrap()).collect();
        assert_eq!(b.request().unwrap_err(), Overflow::Requests(3));
        held.pop();
        assert!(b.request().is_ok());
    }

    #[test]
    fn retries_overflow_at_max_retries() {
        let b = limits(|l| l.max_retries = 1);
        let _r = b.retry().unwrap();
        assert_eq!(b.retry().unwrap_err(), Overflow::Retries(1));
    }

    #[test]
    fn resources_are_counted_apart() {
        let b = limits(|l| {
            l.max_connections = 1;
            l.max_requests = 1;
        });
        let _c = b.connection().unwrap();
        assert!(b.request().is_ok(), "a connection does not use a request unit");
    }

    #[test]
    fn overflows_are_counted_per_resource() {
        let b = limits(|l| l.max_retries = 0);
        assert!(b.retry().is_err());
        assert!(b.retry().is_err());
        assert_eq!(b.usage().overflows, [0, 0, 0, 2]);
    }

    #[test]
    fn overflow_means_503_uo() {
        let e = limits(|l| l.max_requests = 0).request().unwrap_err();
        assert_eq!((Overflow::STATUS, Overflow::RESPONSE_FLAG), (503, "UO"));
        assert_eq!(e.resource(), Resource::Requests);
        assert_eq!(e.to_string(), "active request limit 0 reached (connectionPool.http.http2MaxRequests)");
    }

    #[test]
    fn defaults_do_not_limit() {
        let b = limits(|_| {});
        let held: Vec<Permit> = (0..10_000).map(|_| b.request().unwrap()).collect();
        assert_eq!(b.usage().requests, 10_000);
        drop(held);
    }

    #[test]
    fn connection_retires_after_max_requests_per_connection() {
        let b = limits(|l| l.max_requests_per_connection = Some(2));
        assert!(!retires(b.max_requests_per_connection(), 1));
        assert!(retires(b.max_requests_per_connection(), 2));
        assert!(!retires(limits(|_| {}).max_requests_per_connection(), u32::MAX), "unlimited by default");
    }

    #[test]
    fn concurrent_acquirers_never_exceed_the_limit() {
        let b = limits(|l| l.max_requests = 8);
        let peak = Arc::new(AtomicU32::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (b, peak) = (b.clone(), peak.clone());
                s.spawn(move || {
                    for _ in 0..10_000 {
                        if let Ok(p) = b.request() {
                            peak.fetch_max(b.usage().requests, Ordering::Relaxed);
                            drop(p);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 8);
        assert_eq!(b.usage().requests, 0);
    }
}
