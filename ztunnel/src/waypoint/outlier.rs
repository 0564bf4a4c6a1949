//! Outlier detection per endpoint (issue "Traffic policy", DestinationRule
//! `outlierDetection`): endpoints that keep failing are ejected from load balancing for a
//! while. This module exists to hold that state machine apart from I/O: every call takes the
//! time as an explicit `now: Instant`, so ejection and return are tested without sleeping.
//!
//! # API
//!
//! - [`Outliers::new`]`(Option<OutlierPolicy>)`: one per cluster (service, subset, port), from
//!   `EffectivePolicy::outlier` (`None`: detection off, nothing is ever ejected).
//! - [`Outliers::sync`]`(&[SocketAddr])` when the endpoint list changes: percentages are of
//!   that pool; state of endpoints still present is kept.
//! - [`Outliers::record`]`(endpoint, Outcome, now) -> Option<Ejection>` after every attempt.
//! - [`Outliers::is_ejected`]`(endpoint, now)`; [`Outliers::usable`]`(&[SocketAddr], now)` is
//!   the mask `waypoint::lb::Balancer::pick` takes (panic mode applied).
//! - [`Outliers::snapshot`]`(now)` for metrics and `ctl`/debug output.
//!
//! # Semantics (Envoy's `outlier_detection_impl.cc`, as Istio configures it)
//!
//! - An outcome is a status: a response's, 503 for a connect failure or a reset, 504 for a
//!   timeout (Envoy's local-origin mapping without `splitExternalLocalOriginErrors`). 500-599
//!   count toward `consecutive5xxErrors`; 502, 503, 504 also toward
//!   `consecutiveGatewayErrors` (another 5xx resets only the gateway count); anything else
//!   resets both. Reaching a threshold tries an ejection and resets that count.
//! - Ejection is refused (counted as overflow) when it would take the ejected share over
//!   `maxEjectionPercent`: current Envoy ejects only if `100 × (ejected + 1) / endpoints ≤
//!   max%` (`always_eject_one_host`, which would allow one regardless, is never set by Istio),
//!   so at most `floor(endpoints × max% / 100)` are out at once: none of 5 endpoints at the
//!   default 10%, one of 10. (Envoy before `always_eject_one_host` compared the share before
//!   the ejection, `ejected / endpoints < max%`, which always allowed one.)
//! - An ejection lasts `min(baseEjectionTime × k, max(300s, baseEjectionTime))`, `k` Envoy's
//!   backoff: +1 per ejection, −1 per `interval` spent un-ejected; so `baseEjectionTime ×
//!   number of times ejected` for a host failing again right after its return. The endpoint
//!   returns the moment that time is over (Envoy checks on its `interval` timer, so it can be up
//!   to one interval later there), its failure counts reset.
//! - Outcomes recorded while an endpoint is ejected are ignored.
//! - `minHealthPercent` is Envoy's panic threshold: when the share of endpoints not ejected
//!   falls below it, [`Outliers::usable`] reports every endpoint usable (Istio: "outlier
//!   detection will be disabled and the proxy will load balance across all hosts"). The default
//!   0 never panics: with every endpoint ejected, none is usable (503 `UH`). Envoy applies it per
//!   priority, normalised; here it is applied to the whole pool.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::routing::traffic_policy::OutlierPolicy;

/// What became of one attempt to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status (from the endpoint).
    Response(u16),
    /// No connection could be made (counts as 503).
    ConnectFailure,
    /// The connection broke before a response (counts as 503).
    Reset,
    /// No response in time (counts as 504).
    Timeout,
}

impl Outcome {
    /// The status Envoy counts for it.
    pub fn status(self) -> u16 {
        match self {
            Outcome::Response(s) => s,
            Outcome::ConnectFailure | Outcome::Reset => 503,
            Outcome::Timeout => 504,
        }
    }
}

/// What a recorded outcome did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ejection {
    /// The endpoint is ejected for this long.
    Ejected(Duration),
    /// It met a threshold but `maxEjectionPercent` kept it in.
    Overflow,
}

/// One endpoint's detector state.
#[derive(Debug, Clone, Default)]
struct Host {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    /// Envoy's `ejectTimeBackoff`.
    backoff: u32,
    times_ejected: u32,
    unejected_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    policy: Option<OutlierPolicy>,
    hosts: HashMap<SocketAddr, Host>,
    /// The earliest `ejected_until`, so most calls skip the sweep.
    next_return: Option<Instant>,
    ejections_total: u64,
    overflow_total: u64,
}

impl State {
    /// Returns endpoints whose ejection is over at `now`.
    fn sweep(&mut self, now: Instant) {
        if self.next_return.is_none_or(|t| now < t) {
            return;
        }
        let mut next = None;
        for h in self.hosts.values_mut() {
            match h.ejected_until {
                Some(until) if until <= now => {
                    h.ejected_until = None;
                    h.unejected_at = Some(until);
                    h.consecutive_5xx = 0;
                    h.consecutive_gateway = 0;
                }
                Some(until) => next = Some(next.map_or(until, |n: Instant| n.min(until))),
                None => {}
            }
        }
        self.next_return = next;
    }

    fn ejected(&self) -> usize {
        self.hosts.values().filter(|h| h.ejected_until.is_some()).count()
    }
}

/// Outlier detection for one cluster's endpoints.
#[derive(Debug, Default)]
pub struct Outliers {
    state: Mutex<State>,
}

/// One endpoint in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointHealth {
    pub addr: SocketAddr,
    /// Time left of its ejection; `None`: not ejected.
    pub ejected_for: Option<Duration>,
    pub times_ejected: u32,
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
}

/// The detector's state at one moment, for metrics and debugging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// By address.
    pub endpoints: Vec<EndpointHealth>,
    pub ejected: usize,
    /// Ejections made so far (Envoy's `ejections_enforced_total`).
    pub ejections_total: u64,
    /// Ejections refused by `maxEjectionPercent` (Envoy's `ejections_overflow`).
    pub ejections_overflow: u64,
    /// Whether `minHealthPercent` has every endpoint in use.
    pub panic: bool,
}

impl Outliers {
    /// A detector with `policy` (`None`: off).
    pub fn new(policy: Option<OutlierPolicy>) -> Self {
        Outliers { state: Mutex::new(State { policy, ..State::default() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the policy (a DestinationRule changed), keeping endpoint state; `None`
    /// returns every endpoint.
    pub fn set_policy(&self, policy: Option<OutlierPolicy>) {
        let mut s = self.lock();
        if policy.is_none() {
            for h in s.hosts.values_mut() {
                h.ejected_until = None;
            }
            s.next_return = None;
        }
        s.policy = policy;
    }

    /// The pool is now `endpoints`: new ones start healthy, gone ones are forgotten.
    pub fn sync(&self, endpoints: &[SocketAddr]) {
        let mut s = self.lock();
        s.hosts.retain(|a, _| endpoints.contains(a));
        for a in endpoints {
            s.hosts.entry(*a).or_default();
        }
    }

    /// Counts `outcome` for `endpoint` (added to the pool if unknown); `Some` when it met a
    /// threshold.
    pub fn record(&self, endpoint: SocketAddr, outcome: Outcome, now: Instant) -> Option<Ejection> {
        let mut s = self.lock();
        let policy = s.policy.clone()?;
        s.sweep(now);
        let h = s.hosts.entry(endpoint).or_default();
        if h.ejected_until.is_some() {
            return None;
        }
        let status = outcome.status();
        let mut trigger = false;
        if (500..600).contains(&status) {
            if matches!(status, 502..=504) {
                h.consecutive_gateway += 1;
                if policy.consecutive_gateway.is_some_and(|n| h.consecutive_gateway >= n) {
                    h.consecutive_gateway = 0;
                    trigger = true;
                }
            } else {
                h.consecutive_gateway = 0;
            }
            h.consecutive_5xx += 1;
            if policy.consecutive_5xx.is_some_and(|n| h.consecutive_5xx >= n) {
                h.consecutive_5xx = 0;
                trigger = true;
            }
        } else {
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
        }
        if !trigger {
            return None;
        }
        let (ejected, total) = (s.ejected() as u64, s.hosts.len() as u64);
        if 100 * (ejected + 1) > u64::from(policy.max_ejection_percent) * total {
            s.overflow_total += 1;
            return Some(Ejection::Overflow);
        }
        let h = s.hosts.get_mut(&endpoint)?;
        if let Some(back) = h.unejected_at {
            let idle = now.saturating_duration_since(back).as_nanos() / policy.interval.as_nanos().max(1);
            h.backoff = h.backoff.saturating_sub(u32::try_from(idle).unwrap_or(u32::MAX));
        }
        let (base, max) = (policy.base_ejection_time, policy.max_ejection_time);
        if base.saturating_mul(h.backoff) < max.saturating_add(base) {
            h.backoff += 1;
        }
        let time = base.saturating_mul(h.backoff).min(max);
        let until = now + time;
        h.ejected_until = Some(until);
        h.times_ejected += 1;
        s.ejections_total += 1;
        s.next_return = Some(s.next_return.map_or(until, |n| n.min(until)));
        Some(Ejection::Ejected(time))
    }

    /// Whether `endpoint` is ejected at `now`.
    pub fn is_ejected(&self, endpoint: SocketAddr, now: Instant) -> bool {
        let mut s = self.lock();
        s.sweep(now);
        s.hosts.get(&endpoint).is_some_and(|h| h.ejected_until.is_some())
    }

    /// Per endpoint of `endpoints`, whether load balancing may use it at `now`: not ejected,
    /// or every one when the share not ejected is below `minHealthPercent` (panic).
    pub fn usable<'a>(&self, endpoints: impl IntoIterator<Item = &'a SocketAddr>, now: Instant) -> Vec<bool> {
        let mut s = self.lock();
        s.sweep(now);
        let mut healthy: Vec<bool> =
            endpoints.into_iter().map(|a| s.hosts.get(a).is_none_or(|h| h.ejected_until.is_none())).collect();
        if panic(&s, &healthy) {
            healthy.fill(true);
        }
        healthy
    }

    /// Every known endpoint's state at `now`, by address.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let mut s = self.lock();
        s.sweep(now);
        let mut endpoints: Vec<EndpointHealth> = s
            .hosts
            .iter()
            .map(|(a, h)| EndpointHealth {
                addr: *a,
                ejected_for: h.ejected_until.map(|u| u.saturating_duration_since(now)),
                times_ejected: h.times_ejected,
                consecutive_5xx: h.consecutive_5xx,
                consecutive_gateway: h.consecutive_gateway,
            })
            .collect();
        endpoints.sort_by_key(|e| e.addr);
        let healthy: Vec<bool> = endpoints.iter().map(|e| e.ejected_for.is_none()).collect();
        Snapshot {
            ejected: s.ejected(),
            ejections_total: s.ejections_total,
            ejections_overflow: s.overflow_total,
            panic: panic(&s, &healthy),
            endpoints,
        }
    }
}

/// Whether the healthy share of `healthy` is below `minHealthPercent`.
fn panic(s: &State, healthy: &[bool]) -> bool {
    let min = s.policy.as_ref().map_or(0, |p| p.min_health_percent);
    let n = healthy.iter().filter(|h| **h).count();
    min > 0 && !healthy.is_empty() && 100 * n < min as usize * healthy.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(30);

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::new([10, 0, 0, i].into(), 8080)
    }

    fn pool(n: u8, policy: OutlierPolicy) -> Outliers {
        let o = Outliers::new(Some(policy));
        o.sync(&(0..n).map(addr).collect::<Vec<_>>());
        o
    }

    /// Consecutive 5xx of 3, every endpoint may be ejected.
    fn strict() -> OutlierPolicy {
        OutlierPolicy { consecutive_5xx: Some(3), max_ejection_percent: 100, ..OutlierPolicy::default() }
    }

    fn fail(o: &Outliers, a: SocketAddr, times: usize, now: Instant) -> Option<Ejection> {
        (0..times).map(|_| o.record(a, Outcome::Response(500), now)).last().flatten()
    }

    #[test]
    fn consecutive_5xx_eject_for_the_base_time() {
        let (o, t0) = (pool(4, strict()), Instant::now());
        assert_eq!(fail(&o, addr(0), 2, t0), None);
        assert!(!o.is_ejected(addr(0), t0));
        assert_eq!(o.record(addr(0), Outcome::Response(503), t0), Some(Ejection::Ejected(BASE)));
        assert!(o.is_ejected(addr(0), t0));
    }

    #[test]
    fn a_success_resets_the_count() {
        let (o, t0) = (pool(4, strict()), Instant::now());
        fail(&o, addr(0), 2, t0);
        o.record(addr(0), Outcome::Response(200), t0);
        assert_eq!(fail(&o, addr(0), 2, t0), None);
        assert!(!o.is_ejected(addr(0), t0));
    }

    #[test]
    fn connect_failures_count_as_5xx() {
        let (o, t0) = (pool(4, strict()), Instant::now());
        for _ in 0..3 {
            o.record(addr(0), Outcome::ConnectFailure, t0);
        }
        assert!(o.is_ejected(addr(0), t0));
    }

    #[test]
    fn an_ejected_endpoint_returns_when_its_time_is_over() {
        let (o, t0) = (pool(4, strict()), Instant::now());
        fail(&o, addr(0), 3, t0);
        assert!(o.is_ejected(addr(0), t0 + BASE - Duration::from_millis(1)));
        assert!(!o.is_ejected(addr(0), t0 + BASE));
    }

    #[test]
    fn ejection_time_grows_with_each_ejection() {
        let (o, t0) = (pool(4, strict()), Instant::now());
        assert_eq!(fail(&o, addr(0), 3, t0), Some(Ejection::Ejected(BASE)));
        let t1 = t0 + BASE;
        assert_eq!(fail(&o, addr(0), 3, t1), Some(Ejection::Ejected(BASE * 2)));
        let t2 = t1 + BASE * 2;
        assert_eq!(fail(&o, addr(0), 3, t2), Some(Ejection::Ejected(BASE * 3)));
        assert!(o.is_ejected(addr(0), t2 + BASE * 3 - Duration::from_millis(1)));
        assert_eq!(o.snapshot(t2).endpoints[0].times_ejected, 3);
    }

    #[test]
    fn ejection_time_is_capped_at_the_max_ejection_time() {
        let (o, mut t) = (pool(4, strict()), Instant::now());
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            let Some(Ejection::Ejected(d)) = fail(&o, addr(0), 3, t) else { panic!("not ejected") };
            last = d;
            t += d;
        }
        assert_eq!(last, Duration::from_secs(300));
    }

    #[test]
    fn time_spent_healthy_shrinks_the_next_ejection() {
        let (o, t0) = (pool(4, strict()), Instant::now());
        fail(&o, addr(0), 3, t0);
        fail(&o, addr(0), 3, t0 + BASE);
        // Back at t0 + 90s with backoff 2; 2 intervals (10s) healthy take it to 0, then +1.
        let back = t0 + BASE * 3;
        assert_eq!(fail(&o, addr(0), 3, back + Duration::from_secs(20)), Some(Ejection::Ejected(BASE)));
    }

    #[test]
    fn gateway_errors_eject_on_their_own_threshold() {
        let p = OutlierPolicy {
            consecutive_5xx: None,
            consecutive_gateway: Some(2),
            max_ejection_percent: 100,
            ..strict()
        };
        let (o, t0) = (pool(4, p), Instant::now());
        o.record(addr(0), Outcome::Response(502), t0);
        o.record(addr(0), Outcome::Response(500), t0);
        o.record(addr(0), Outcome::Timeout, t0);
        assert!(!o.is_ejected(addr(0), t0), "a 500 resets the gateway count");
        o.record(addr(0), Outcome::Reset, t0);
        assert!(o.is_ejected(addr(0), t0));
    }

    #[test]
    fn consecutive_5xx_disabled_never_ejects() {
        let p = OutlierPolicy { consecutive_5xx: None, ..strict() };
        let (o, t0) = (pool(4, p), Instant::now());
        assert_eq!(fail(&o, addr(0), 50, t0), None);
    }

    #[test]
    fn without_a_policy_nothing_is_ejected() {
        let (o, t0) = (Outliers::new(None), Instant::now());
        assert_eq!(fail(&o, addr(0), 50, t0), None);
        assert!(!o.is_ejected(addr(0), t0));
    }

    #[test]
    fn max_ejection_percent_caps_the_ejected_share() {
        let p = OutlierPolicy { max_ejection_percent: 20, ..strict() };
        let (o, t0) = (pool(10, p), Instant::now());
        let results: Vec<_> = (0..4).map(|i| fail(&o, addr(i), 3, t0)).collect();
        assert_eq!(results[..2], [Some(Ejection::Ejected(BASE)); 2]);
        assert_eq!(results[2..], [Some(Ejection::Overflow); 2]);
        let snap = o.snapshot(t0);
        assert_eq!((snap.ejected, snap.ejections_total, snap.ejections_overflow), (2, 2, 2));
    }

    #[test]
    fn default_ten_percent_ejects_none_of_five_endpoints() {
        let p = OutlierPolicy { consecutive_5xx: Some(3), ..OutlierPolicy::default() };
        let (o, t0) = (pool(5, p), Instant::now());
        assert_eq!(fail(&o, addr(0), 3, t0), Some(Ejection::Overflow));
    }

    #[test]
    fn default_ten_percent_ejects_one_of_ten_endpoints() {
        let p = OutlierPolicy { consecutive_5xx: Some(3), ..OutlierPolicy::default() };
        let (o, t0) = (pool(10, p), Instant::now());
        assert_eq!(fail(&o, addr(0), 3, t0), Some(Ejection::Ejected(BASE)));
        assert_eq!(fail(&o, addr(1), 3, t0), Some(Ejection::Overflow));
    }

    #[test]
    fn usable_leaves_out_ejected_endpoints() {
        let (o, t0) = (pool(4, strict()), Instant::now());
        fail(&o, addr(1), 3, t0);
        let all: Vec<_> = (0..4).map(addr).collect();
        assert_eq!(o.usable(&all, t0), vec![true, false, true, true]);
        assert_eq!(o.usable(&all, t0 + BASE), vec![true; 4]);
    }

    #[test]
    fn below_min_health_percent_every_endpoint_is_usable() {
        let p = OutlierPolicy { min_health_percent: 50, ..strict() };
        let (o, t0) = (pool(4, p), Instant::now());
        let all: Vec<_> = (0..4).map(addr).collect();
        fail(&o, addr(0), 3, t0);
        fail(&o, addr(1), 3, t0);
        assert_eq!(o.usable(&all, t0), vec![false, false, true, true], "50% healthy is not below 50%");
        fail(&o, addr(2), 3, t0);
        assert_eq!(o.usable(&all, t0), vec![true; 4], "25% healthy: panic");
        assert!(o.snapshot(t0).panic);
    }

    #[test]
    fn with_min_health_zero_all_ejected_leaves_none_usable() {
        let (o, t0) = (pool(2, strict()), Instant::now());
        fail(&o, addr(0), 3, t0);
        fail(&o, addr(1), 3, t0);
        assert_eq!(o.usable(&[addr(0), addr(1)], t0), vec![false, false]);
    }

    #[test]
    fn outcomes_while_ejected_are_ignored_and_counts_restart_on_return() {
        let (o, t0) = (pool(4, strict()), Instant::now());
        fail(&o, addr(0), 3, t0);
        fail(&o, addr(0), 2, t0 + Duration::from_secs(1));
        let back = t0 + BASE;
        assert_eq!(o.snapshot(back).endpoints[0].consecutive_5xx, 0);
        assert_eq!(fail(&o, addr(0), 2, back), None);
    }

    #[test]
    fn sync_forgets_endpoints_that_are_gone() {
        let (o, t0) = (pool(4, strict()), Instant::now());
        fail(&o, addr(3), 3, t0);
        o.sync(&[addr(0), addr(1)]);
        let snap = o.snapshot(t0);
        assert_eq!(snap.endpoints.iter().map(|e| e.addr).collect::<Vec<_>>(), vec![addr(0), addr(1)]);
        assert_eq!(snap.ejected, 0);
    }

    #[test]
    fn removing_the_policy_returns_every_endpoint() {
        let (o, t0) = (pool(4, strict()), Instant::now());
        fail(&o, addr(0), 3, t0);
        o.set_policy(None);
        assert!(!o.is_ejected(addr(0), t0));
    }
}
