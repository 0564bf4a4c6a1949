//! DestinationRule `trafficPolicy` (issue "Traffic policy"): Istio's shape read strictly,
//! validated as Istio's webhook validates it, and resolved for one (subset, port) into the
//! values the waypoint applies, with Istio's and Envoy's defaults filled in. This module
//! exists so the whole of that policy is a pure function of config: no I/O, no clock, no
//! randomness, and every rule is testable as a table of cases.
//!
//! # API
//!
//! - [`TrafficPolicy`] and the types under it: the YAML shape (camelCase). Istio's schema is
//!   closed, so every message denies unknown fields: a misspelt field rejects the
//!   DestinationRule instead of being silently ignored.
//! - [`DrPolicy::compile`]`(top, subsets)`: validates a DestinationRule's top-level and
//!   per-subset policies into a [`DrPolicy`], or a [`PolicyError`] naming the field
//!   (`trafficPolicy.outlierDetection.maxEjectionPercent: 150 is over 100`).
//!   [`super::objects::load`] does this for every DestinationRule and keeps the result in
//!   `RoutingObjects::policies` (host → `Arc<DrPolicy>`).
//! - [`effective`]`(dr, subset, port)` (also [`DrPolicy::effective`]): the [`EffectivePolicy`]
//!   for requests to `subset` (or the whole service) on service port `port`.
//!   [`EffectivePolicy::default`] is what applies to a host no DestinationRule covers.
//!
//! The waypoint (wired in `waypoint/http.rs`, `send.rs` / `upstream.rs`): `policies.get(host)` →
//! `effective(..)` → `load_balancer` + `locality` to `waypoint::lb::Balancer`, `outlier` to
//! `waypoint::outlier::Outliers`, `connection_pool` to `waypoint::circuit::Breaker` (and the
//! connect / idle timeouts to the connector), `tls` to the upstream connector.
//!
//! # Override rules
//!
//! Taken from istio/istio (commit 86c9f01, 2026-08): `MergeSubsetTrafficPolicy` and
//! `GetPortLevelTrafficPolicy` in pilot/pkg/networking/util/util.go, `MergeTrafficPolicy` in
//! pilot/pkg/model/destination_rule.go, called from `buildSubsetCluster` in
//! pilot/pkg/networking/core/cluster_builder.go:
//!
//! 1. The top-level policy, unless its `portLevelSettings` has an entry for the port (the first
//!    such entry wins): that entry then replaces **all four** of `loadBalancer`,
//!    `connectionPool`, `outlierDetection` and `tls`; what it omits takes the defaults, it is not
//!    inherited from the top level.
//! 2. A subset's `trafficPolicy` overrides the result of 1 component by component: each of the
//!    four it sets replaces the same component as a whole (no deeper merge), the others stay.
//! 3. If the subset's own `portLevelSettings` has an entry for the port, that entry replaces all
//!    four instead (what it omits takes the defaults, as in 1).
//!
//! # Defaults
//!
//! - load balancer, `simple` unset or `UNSPECIFIED`: `LEAST_REQUEST` (Istio
//!   `defaultLBAlgorithm`, pilot/pkg/networking/core/cluster_traffic_policy.go); `LEAST_CONN`:
//!   `LEAST_REQUEST` (Istio `applyLoadBalancer`).
//! - consistent hash with neither `ringHash` nor `maglev`: a ring of 1024 points, or the
//!   deprecated `minimumRingSize` (Istio `ApplyRingHashLoadBalancer`); `ringHash.minimumRingSize`
//!   0: 1024, at most 8388608 (Envoy `RingHashLbConfig`).
//! - `maglev.tableSize`: required, prime, under 5000011 (Istio validation.go); the API doc's
//!   default 65537 (Envoy's) is never reached, since Istio's validation requires the field.
//! - `httpCookie.ttl` unset: no cookie generated (the request then has no hash: a random pick);
//!   `0s`: a session cookie (destination_rule.proto, Envoy `HashPolicy.Cookie`).
//! - locality LB: enabled (Istio's mesh default `localityLbSetting: {enabled: true}`), failing
//!   over by region/zone/subzone only when outlier detection is set
//!   (`LocalityLBSettings.ApplyToCluster`, loadbalancer.go).
//! - `tcp.maxConnections`, `http.http1MaxPendingRequests`, `http2MaxRequests`, `maxRetries`,
//!   0 or unset: 2^32-1 (Istio `getDefaultCircuitBreakerThresholds`);
//!   `http.maxRequestsPerConnection` 0: unlimited (destination_rule.proto).
//! - `tcp.connectTimeout`: 10s (Istio's mesh default `connectTimeout`, pkg/config/mesh/mesh.go).
//! - idle timeout: `http.idleTimeout`, else `tcp.idleTimeout` (`0s`: none), else 1h (Istio
//!   `applyConnectionPool`; destination_rule.proto).
//! - outlier detection: off unless `outlierDetection` is set (Istio `applyOutlierDetection`);
//!   then `consecutive5xxErrors` unset: 5, 0 disables (Envoy `consecutive_5xx`, enforced 100%);
//!   `consecutiveGatewayErrors` unset or 0: disabled (Envoy's enforcing default 0);
//!   `interval` 10s and `baseEjectionTime` 30s (Envoy `OutlierDetection`); longest ejection
//!   max(300s, baseEjectionTime) (Envoy `max_ejection_time`); `maxEjectionPercent` unset or 0:
//!   10 (Istio sets it only when > 0; Envoy's default 10%); `minHealthPercent` 0, panic mode off
//!   (Istio sets Envoy's `healthy_panic_threshold` to it).
//! - `tls` unset: `None`, the waypoint's own HBONE mTLS; `tls` without `mode`: `DISABLE`
//!   (destination_rule.proto).
//!
//! # Accepted, not applied
//!
//! Valid fields this waypoint does not act on are read (so they are not rejections) and
//! ignored: `tunnel`, `proxyProtocol`, `retryBudget`, `loadBalancer.warmup`,
//! `warmupDurationSecs`, `zoneAwareLbSetting`, `tcp.tcpKeepalive`,
//! `tcp.maxConnectionDuration`, `http.maxConcurrentStreams`, `http.http2KeepAlive`,
//! `outlierDetection.consecutiveErrors` (Istio itself has ignored it since istio/istio#24087),
//! `splitExternalLocalOriginErrors`, `consecutiveLocalOriginFailures`,
//! `outlierDetectionHttpErrorCodes`, and every `tls` field but `mode`.
//!
//! # Deviation
//!
//! Istio's webhook accepts a `consistentHash` with no hash key (Envoy then hashes nothing and
//! picks at random); here it is rejected ("exactly one of ..."), as a policy that cannot do
//! what it says.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::compile::duration;

mod resolved;
mod shape;
pub use resolved::*;
pub use shape::*;

/// Envoy's `minimum_ring_size` default.
pub const DEFAULT_RING_SIZE: u64 = 1024;
/// Envoy's `maximum_ring_size` (and its cap on `minimum_ring_size`).
pub const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Envoy's Maglev table size default.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;
/// Istio's validation: a Maglev table must be smaller than this.
pub const MAGLEV_TABLE_LIMIT: u64 = 5_000_011;
/// Istio's mesh default `connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Envoy's upstream idle timeout default (`CommonHttpProtocolOptions.idle_timeout`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Envoy's `OutlierDetection.interval` default.
pub const DEFAULT_OUTLIER_INTERVAL: Duration = Duration::from_secs(10);
/// Envoy's `OutlierDetection.base_ejection_time` default.
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
/// Envoy's `OutlierDetection.max_ejection_time` default.
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// Envoy's `OutlierDetection.consecutive_5xx` default.
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
/// Envoy's `OutlierDetection.max_ejection_percent` default.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

/// Why a traffic policy is invalid, with the path of the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct PolicyError {
    /// e.g. `trafficPolicy.outlierDetection.maxEjectionPercent`,
    /// `subsets[v1].trafficPolicy.portLevelSettings[0].loadBalancer.consistentHash`.
    pub field: String,
    pub problem: Problem,
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("must have at least one field")]
    Empty,
    #[error("is required")]
    Required,
    #[error("{0} is negative")]
    Negative(i64),
    #[error("{0} is over 100")]
    OverHundred(i64),
    #[error("{0} is over {1}")]
    OverLimit(u64, u64),
    #[error("{0} is out of the int32 range")]
    OutOfRange(i64),
    #[error("{0}")]
    Duration(String),
    #[error("{0:?} is under 1ms")]
    UnderOneMilli(String),
    #[error("{0:?} is not in whole milliseconds")]
    SubMilli(String),
    #[error("only one of simple, consistentHash")]
    SimpleAndHash,
    #[error("exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName")]
    HashKey,
    #[error("only one of ringHash, maglev")]
    RingAndMaglev,
    #[error("minimumRingSize (deprecated) cannot be set with ringHash or maglev")]
    DeprecatedRingSize,
    #[error("{0} is not a prime")]
    NotPrime(u64),
    #[error("{0:?} is not a header name")]
    HeaderName(String),
    #[error("distribute and failover cannot both be set")]
    DistributeAndFailover,
    #[error("weight {0} is not in 1..=100")]
    Weight(u32),
    #[error("weights total {0}, not 100")]
    WeightTotal(u64),
    #[error("{0:?}: '*' may appear once, last, and no part may be empty")]
    Locality(String),
    #[error("from and to are both {0:?}")]
    SameRegion(String),
    #[error("{0:?} is not a region (no '/' or '*')")]
    NotRegion(String),
    #[error("failover cannot be set with topology label {0} in failoverPriority")]
    FailoverWithTopologyLabel(String),
    #[error("useClientProtocol cannot be true with h2UpgradePolicy UPGRADE")]
    ClientProtocolWithUpgrade,
    #[error("MUTUAL without credentialName needs clientCertificate and privateKey")]
    MutualWithoutCertificate,
}

fn err(field: impl Into<String>, problem: Problem) -> PolicyError {
    PolicyError { field: field.into(), problem }
}

// ---------------------------------------------------------------------------------------------
// Compilation and resolution.
// ---------------------------------------------------------------------------------------------

/// One level (top, port entry, subset, subset port entry) after validation: a component is
/// `None` when the level does not set it.
#[derive(Debug, Clone, Default, PartialEq)]
struct Level {
    lb: Option<(LbAlgorithm, LocalityLb)>,
    pool: Option<PoolLimits>,
    outlier: Option<OutlierPolicy>,
    tls: Option<TlsMode>,
}

/// A policy with its port-level entries, in order (the first entry for a port wins).
#[derive(Debug, Clone, Default, PartialEq)]
struct Policy {
    level: Level,
    ports: Vec<(u32, Level)>,
}

impl Policy {
    /// Rule 1 / 3: the port's entry replaces all four components, else the policy's own.
    fn for_port(&self, port: u16) -> (Level, bool) {
        match self.ports.iter().find(|(p, _)| *p == u32::from(port)) {
            Some((_, l)) => (l.clone(), true),
            None => (self.level.clone(), false),
        }
    }
}

/// A DestinationRule's validated traffic policies: top level and per subset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DrPolicy {
    top: Option<Policy>,
    subsets: BTreeMap<String, Policy>,
}

impl DrPolicy {
    /// Validates the top-level `trafficPolicy` and each subset's (`(name, policy)`), as
    /// Istio's webhook does; the first problem found is returned, naming its field.
    pub fn compile(
        top: Option<&TrafficPolicy>,
        subsets: &[(&str, Option<&TrafficPolicy>)],
    ) -> Result<Self, PolicyError> {
        let top = top.map(|t| compile_policy(t, "trafficPolicy")).transpose()?;
        let mut out = DrPolicy { top, subsets: BTreeMap::new() };
        for (name, tp) in subsets {
            if let Some(tp) = tp {
                let p = compile_policy(tp, &format!("subsets[{name}].trafficPolicy"))?;
                out.subsets.insert(name.to_string(), p);
            }
        }
        Ok(out)
    }

    /// True when neither the DestinationRule nor any subset sets a policy.
    pub fn is_empty(&self) -> bool {
        self.top.is_none() && self.subsets.is_empty()
    }

    /// Adds what `other` (a later DestinationRule for the same host) brings, as Istio merges
    /// DestinationRules: the first top-level policy wins, subsets not yet known are added.
    pub fn absorb(&mut self, other: DrPolicy) {
        if self.top.is_none() {
            self.top = other.top;
        }
        for (name, p) in other.subsets {
            self.subsets.entry(name).or_insert(p);
        }
    }

    /// See [`effective`].
    pub fn effective(&self, subset: Option<&str>, port: u16) -> EffectivePolicy {
        effective(self, subset, port)
    }
}

/// The policy for requests to `subset` (`None`: the service as a whole; an unknown subset
/// counts as one without a policy) on service port `port`, by Istio's override rules (see
/// the module doc), every default filled in.
pub fn effective(dr: &DrPolicy, subset: Option<&str>, port: u16) -> EffectivePolicy {
    let (mut merged, _) = dr.top.as_ref().map(|p| p.for_port(port)).unwrap_or_default();
    if let Some(sp) = subset.and_then(|s| dr.subsets.get(s)) {
        let (level, port_level) = sp.for_port(port);
        if port_level {
            merged = level;
        } else {
            merged.lb = level.lb.or(merged.lb);
            merged.pool = level.pool.or(merged.pool);
            merged.outlier = level.outlier.or(merged.outlier);
            merged.tls = level.tls.or(merged.tls);
        }
    }
    resolve(merged)
}

/// Fills in defaults; locality failover is active only with outlier detection.
fn resolve(level: Level) -> EffectivePolicy {
    let (load_balancer, mut locality) = level.lb.unwrap_or((LbAlgorithm::LeastRequest, LocalityLb::default()));
    locality.failover_active = locality.enabled && level.outlier.is_some();
    EffectivePolicy {
        load_balancer,
        locality,
        connection_pool: level.pool.unwrap_or_default(),
        outlier: level.outlier,
        tls: level.tls,
    }
}

/// `insert` for `RoutingObjects::policies`: the first DestinationRule for a host keeps its
/// top-level policy, later ones add subsets (Istio's DestinationRule merge).
pub fn insert(policies: &mut BTreeMap<String, Arc<DrPolicy>>, host: &str, policy: DrPolicy) {
    if policy.is_empty() {
        return;
    }
    match policies.get_mut(host) {
        Some(have) => Arc::make_mut(have).absorb(policy),
        None => {
            policies.insert(host.to_string(), Arc::new(policy));
        }
    }
}

fn compile_policy(tp: &TrafficPolicy, at: &str) -> Result<Policy, PolicyError> {
    let nothing = tp.load_balancer.is_none()
        && tp.connection_pool.is_none()
        && tp.outlier_detection.is_none()
        && tp.tls.is_none()
        && tp.port_level_settings.is_empty()
        && tp.tunnel.is_none()
        && tp.proxy_protocol.is_none()
        && tp.retry_budget.is_none();
    if nothing {
        return Err(err(at, Problem::Empty));
    }
    let level = compile_level(
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        tp.tls.as_ref(),
        at,
    )?;
    let mut ports = Vec::new();
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let here = format!("{at}.portLevelSettings[{i}]");
        let Some(port) = &p.port else { return Err(err(format!("{here}.port"), Problem::Required)) };
        if p.load_balancer.is_none() && p.connection_pool.is_none() && p.outlier_detection.is_none() && p.tls.is_none()
        {
            return Err(err(here, Problem::Empty));
        }
        let l = compile_level(
            p.load_balancer.as_ref(),
            p.connection_pool.as_ref(),
            p.outlier_detection.as_ref(),
            p.tls.as_ref(),
            &here,
        )?;
        ports.push((port.number, l));
    }
    Ok(Policy { level, ports })
}

fn compile_level(
    lb: Option<&LoadBalancerSettings>,
    pool: Option<&ConnectionPoolSettings>,
    outlier: Option<&OutlierDetection>,
    tls: Option<&ClientTlsSettings>,
    at: &str,
) -> Result<Level, PolicyError> {
    Ok(Level {
        outlier: outlier.map(|o| compile_outlier(o, &format!("{at}.outlierDetection"))).transpose()?,
        pool: pool.map(|p| compile_pool(p, &format!("{at}.connectionPool"))).transpose()?,
        lb: lb.map(|l| compile_lb(l, &format!("{at}.loadBalancer"))).transpose()?,
        tls: tls.map(|t| compile_tls(t, &format!("{at}.tls"))).transpose()?,
    })
}

fn compile_lb(lb: &LoadBalancerSettings, at: &str) -> Result<(LbAlgorithm, LocalityLb), PolicyError> {
    let algorithm = match (&lb.simple, &lb.consistent_hash) {
        (Some(_), Some(_)) => return Err(err(at, Problem::SimpleAndHash)),
        (Some(SimpleLb::RoundRobin), None) => LbAlgorithm::RoundRobin,
        (Some(SimpleLb::Random), None) => LbAlgorithm::Random,
        (Some(SimpleLb::Passthrough), None) => LbAlgorithm::Passthrough,
        (Some(SimpleLb::LeastRequest | SimpleLb::LeastConn | SimpleLb::Unspecified), None) | (None, None) => {
            LbAlgorithm::LeastRequest
        }
        (None, Some(ch)) => LbAlgorithm::ConsistentHash(compile_hash(ch, &format!("{at}.consistentHash"))?),
    };
    let locality = match &lb.locality_lb_setting {
        Some(l) => compile_locality(l, &format!("{at}.localityLbSetting"))?,
        None => LocalityLb::default(),
    };
    Ok((algorithm, locality))
}

fn compile_hash(ch: &ConsistentHashLb, at: &str) -> Result<HashPolicy, PolicyError> {
    let keys = usize::from(ch.http_header_name.is_some())
        + usize::from(ch.http_cookie.is_some())
        + usize::from(ch.use_source_ip == Some(true))
        + usize::from(ch.http_query_parameter_name.is_some());
    if keys != 1 {
        return Err(err(at, Problem::HashKey));
    }
    let key = if let Some(h) = &ch.http_header_name {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            return Err(err(format!("{at}.httpHeaderName"), Problem::HeaderName(h.clone())));
        }
        HashKey::Header(h.to_ascii_lowercase())
    } else if let Some(c) = &ch.http_cookie {
        let here = format!("{at}.httpCookie");
        if c.name.is_empty() {
            return Err(err(format!("{here}.name"), Problem::Required));
        }
        let ttl = c.ttl.as_deref().map(|t| duration(t).map_err(|e| err(format!("{here}.ttl"), Problem::Duration(e))));
        let mut attributes = Vec::new();
        for (i, a) in c.attributes.iter().enumerate() {
            if a.name.is_empty() {
                return Err(err(format!("{here}.attributes[{i}].name"), Problem::Required));
            }
            attributes.push((a.name.clone(), a.value.clone()));
        }
        HashKey::Cookie(CookieSpec {
            name: c.name.clone(),
            path: c.path.clone().filter(|p| !p.is_empty()),
            ttl: ttl.transpose()?,
            attributes,
        })
    } else if let Some(q) = &ch.http_query_parameter_name {
        if q.is_empty() {
            return Err(err(format!("{at}.httpQueryParameterName"), Problem::Required));
        }
        HashKey::QueryParameter(q.clone())
    } else {
        HashKey::SourceIp
    };
    let deprecated = ch.minimum_ring_size.unwrap_or(0);
    let table = match (&ch.ring_hash, &ch.maglev) {
        (Some(_), Some(_)) => return Err(err(at, Problem::RingAndMaglev)),
        (Some(_), None) | (None, Some(_)) if deprecated != 0 => {
            return Err(err(format!("{at}.minimumRingSize"), Problem::DeprecatedRingSize))
        }
        (Some(r), None) => HashTable::Ring { minimum_ring_size: ring_size(r.minimum_ring_size, at, "ringHash.")? },
        (None, None) => HashTable::Ring { minimum_ring_size: ring_size(deprecated, at, "")? },
        (None, Some(m)) => {
            let here = format!("{at}.maglev.tableSize");
            match m.table_size {
                0 => return Err(err(here, Problem::Required)),
                n if n >= MAGLEV_TABLE_LIMIT => return Err(err(here, Problem::OverLimit(n, MAGLEV_TABLE_LIMIT - 1))),
                n if !is_prime(n) => return Err(err(here, Problem::NotPrime(n))),
                n => HashTable::Maglev { table_size: n },
            }
        }
    };
    Ok(HashPolicy { key, table })
}

fn ring_size(n: u64, at: &str, prefix: &str) -> Result<u64, PolicyError> {
    match n {
        0 => Ok(DEFAULT_RING_SIZE),
        n if n > MAX_RING_SIZE => {
            Err(err(format!("{at}.{prefix}minimumRingSize"), Problem::OverLimit(n, MAX_RING_SIZE)))
        }
        n => Ok(n),
    }
}

/// Trial division, as Istio's (and Envoy's) check does; table sizes are below 5000011.
fn is_prime(n: u64) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut f = 3;
    while f * f <= n {
        if n.is_multiple_of(f) {
            return false;
        }
        f += 2;
    }
    true
}

/// Topology labels that `failoverPriority` may not name together with `failover`.
const TOPOLOGY_LABELS: [&str; 3] =
    ["topology.kubernetes.io/region", "topology.kubernetes.io/zone", "topology.istio.io/subzone"];

fn compile_locality(l: &LocalityLbSetting, at: &str) -> Result<LocalityLb, PolicyError> {
    if !l.distribute.is_empty() && !l.failover.is_empty() {
        return Err(err(at, Problem::DistributeAndFailover));
    }
    if !l.failover.is_empty() {
        if let Some(t) = l.failover_priority.iter().find(|p| TOPOLOGY_LABELS.contains(&p.as_str())) {
            return Err(err(format!("{at}.failoverPriority"), Problem::FailoverWithTopologyLabel(t.clone())));
        }
    }
    let mut distribute = Vec::new();
    for (i, d) in l.distribute.iter().enumerate() {
        let here = format!("{at}.distribute[{i}]");
        check_locality(&d.from, &format!("{here}.from"))?;
        let mut total = 0u64;
        for (loc, w) in &d.to {
            check_locality(loc, &format!("{here}.to"))?;
            if !(1..=100).contains(w) {
                return Err(err(format!("{here}.to[{loc}]"), Problem::Weight(*w)));
            }
            total += u64::from(*w);
        }
        if total != 100 {
            return Err(err(format!("{here}.to"), Problem::WeightTotal(total)));
        }
        distribute.push((d.from.clone(), d.to.iter().map(|(k, v)| (k.clone(), *v)).collect()));
    }
    let mut failover = Vec::new();
    for (i, f) in l.failover.iter().enumerate() {
        let here = format!("{at}.failover[{i}]");
        for (name, v) in [("from", &f.from), ("to", &f.to)] {
            if v.contains('/') || v.contains('*') {
                return Err(err(format!("{here}.{name}"), Problem::NotRegion(v.clone())));
            }
        }
        if f.from == f.to {
            return Err(err(here, Problem::SameRegion(f.from.clone())));
        }
        failover.push((f.from.clone(), f.to.clone()));
    }
    Ok(LocalityLb {
        enabled: l.enabled.unwrap_or(true),
        distribute,
        failover,
        failover_priority: l.failover_priority.clone(),
        failover_active: false,
    })
}

/// `region[/zone[/subzone]]`: at most one `*`, as the last part; no empty part.
fn check_locality(loc: &str, at: &str) -> Result<(), PolicyError> {
    let parts: Vec<&str> = loc.split('/').collect();
    let stars = loc.matches('*').count();
    let bad = loc.is_empty()
        || parts.len() > 3
        || parts.iter().any(|p| p.is_empty())
        || stars > 1
        || (stars == 1 && *parts.last().unwrap_or(&"") != "*");
    if bad {
        return Err(err(at, Problem::Locality(loc.to_string())));
    }
    Ok(())
}

fn compile_pool(p: &ConnectionPoolSettings, at: &str) -> Result<PoolLimits, PolicyError> {
    if p.tcp.is_none() && p.http.is_none() {
        return Err(err(at, Problem::Empty));
    }
    let mut out = PoolLimits::default();
    let mut idle = None;
    if let Some(tcp) = &p.tcp {
        let here = format!("{at}.tcp");
        if let Some(n) = limit(tcp.max_connections, &format!("{here}.maxConnections"))? {
            out.max_connections = n;
        }
        if let Some(t) = &tcp.connect_timeout {
            out.connect_timeout = millis_duration(t, &format!("{here}.connectTimeout"))?;
        }
        if let Some(t) = &tcp.max_connection_duration {
            millis_duration(t, &format!("{here}.maxConnectionDuration"))?;
        }
        if let Some(t) = &tcp.idle_timeout {
            let d = duration(t).map_err(|e| err(format!("{here}.idleTimeout"), Problem::Duration(e)))?;
            if !d.is_zero() {
                millis_duration(t, &format!("{here}.idleTimeout"))?;
            }
            idle = Some(d);
        }
    }
    if let Some(h) = &p.http {
        let here = format!("{at}.http");
        if let Some(n) = limit(h.http1_max_pending_requests, &format!("{here}.http1MaxPendingRequests"))? {
            out.max_pending_requests = n;
        }
        if let Some(n) = limit(h.http2_max_requests, &format!("{here}.http2MaxRequests"))? {
            out.max_requests = n;
        }
        out.max_requests_per_connection =
            limit(h.max_requests_per_connection, &format!("{here}.maxRequestsPerConnection"))?;
        if let Some(n) = limit(h.max_retries, &format!("{here}.maxRetries"))? {
            out.max_retries = n;
        }
        limit(h.max_concurrent_streams, &format!("{here}.maxConcurrentStreams"))?;
        if let Some(t) = &h.idle_timeout {
            idle = Some(millis_duration(t, &format!("{here}.idleTimeout"))?);
        }
        out.h2_upgrade_policy = h.h2_upgrade_policy.unwrap_or_default();
        out.use_client_protocol = h.use_client_protocol.unwrap_or(false);
        if out.use_client_protocol && out.h2_upgrade_policy == H2UpgradePolicy::Upgrade {
            return Err(err(format!("{here}.useClientProtocol"), Problem::ClientProtocolWithUpgrade));
        }
    }
    if let Some(d) = idle {
        out.idle_timeout = (!d.is_zero()).then_some(d);
    }
    Ok(out)
}

/// An int32 limit: negative or beyond int32 is an error, 0 (or unset) means "the default".
fn limit(v: Option<i64>, at: &str) -> Result<Option<u32>, PolicyError> {
    match v {
        None | Some(0) => Ok(None),
        Some(n) if n < 0 => Err(err(at, Problem::Negative(n))),
        Some(n) if n > i64::from(i32::MAX) => Err(err(at, Problem::OutOfRange(n))),
        Some(n) => Ok(Some(n as u32)),
    }
}

/// Istio's `ValidateDuration`: at least 1ms, whole milliseconds.
fn millis_duration(s: &str, at: &str) -> Result<Duration, PolicyError> {
    let d = duration(s).map_err(|e| err(at, Problem::Duration(e)))?;
    if d < Duration::from_millis(1) {
        return Err(err(at, Problem::UnderOneMilli(s.to_string())));
    }
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(err(at, Problem::SubMilli(s.to_string())));
    }
    Ok(d)
}

fn compile_outlier(o: &OutlierDetection, at: &str) -> Result<OutlierPolicy, PolicyError> {
    let mut out = OutlierPolicy::default();
    if let Some(n) = o.consecutive_5xx_errors {
        out.consecutive_5xx = (n > 0).then_some(n);
    }
    out.consecutive_gateway = o.consecutive_gateway_errors.filter(|n| *n > 0);
    if let Some(t) = &o.interval {
        out.interval = millis_duration(t, &format!("{at}.interval"))?;
    }
    if let Some(t) = &o.base_ejection_time {
        out.base_ejection_time = millis_duration(t, &format!("{at}.baseEjectionTime"))?;
    }
    out.max_ejection_time = DEFAULT_MAX_EJECTION_TIME.max(out.base_ejection_time);
    if let Some(p) = percent(o.max_ejection_percent, &format!("{at}.maxEjectionPercent"))? {
        if p > 0 {
            out.max_ejection_percent = p;
        }
    }
    if let Some(p) = percent(o.min_health_percent, &format!("{at}.minHealthPercent"))? {
        out.min_health_percent = p;
    }
    Ok(out)
}

/// Istio's `ValidatePercent`: 0..=100.
fn percent(v: Option<i64>, at: &str) -> Result<Option<u32>, PolicyError> {
    match v {
        None => Ok(None),
        Some(n) if n < 0 => Err(err(at, Problem::Negative(n))),
        Some(n) if n > 100 => Err(err(at, Problem::OverHundred(n))),
        Some(n) => Ok(Some(n as u32)),
    }
}

fn compile_tls(t: &ClientTlsSettings, at: &str) -> Result<TlsMode, PolicyError> {
    let mode = t.mode.unwrap_or_default();
    let set = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
    if mode == TlsMode::Mutual && !set(&t.credential_name) && (!set(&t.client_certificate) || !set(&t.private_key)) {
        return Err(err(at, Problem::MutualWithoutCertificate));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests;
