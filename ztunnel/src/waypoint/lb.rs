//! Load balancing over a service's endpoints (issue "Traffic policy"), as a DestinationRule's
//! `loadBalancer` asks. This module exists to keep endpoint choice pure and deterministic: a
//! [`Balancer`] is built once per endpoint-set change and then picks with only the request,
//! the endpoints' health and a random source the caller passes in, so every algorithm is
//! testable by its distribution.
//!
//! # API
//!
//! - [`Balancer::new`]`(&EffectivePolicy, endpoints, &Caller)`: builds the priorities, locality
//!   weights and the consistent-hash table (ring or Maglev) once.
//! - [`Balancer::pick`]`(&RequestView, usable, &mut fastrand::Rng) -> Option<Pick>`: an endpoint
//!   index among those `usable` (from `waypoint::outlier::Outliers::usable`), the in-flight
//!   guard ([`InFlight`], hold it until the response is done: LEAST_REQUEST counts it) and, for
//!   a generated `httpCookie`, the `Set-Cookie` value the caller adds to the response.
//!   `None`: no usable endpoint (the caller answers 503, response flag `UH`).
//! - [`Balancers`]: the cache, one balancer per [`ClusterKey`] (service, subset, port), rebuilt
//!   only when the endpoint list, the policy or the caller changes.
//!
//! # Semantics (Envoy's, as Istio configures it)
//!
//! - `ROUND_ROBIN`: the next usable endpoint of the chosen priority, in turn.
//! - `LEAST_REQUEST` (also the default): two random candidates, the one with fewer requests in
//!   flight (ties: the first), Envoy's `choice_count` 2.
//! - `RANDOM`: uniform among the usable endpoints of the chosen priority.
//! - `PASSTHROUGH`: no balancing. Istio sends to the address the client dialled (Envoy's
//!   `ORIGINAL_DST`); for a waypoint that address is the service VIP, so: the endpoint the
//!   request names in [`RequestView::target`] when it is one of the service's endpoints, else
//!   the first usable endpoint in list order.
//! - consistent hash: the key is hashed (64-bit FNV-1a with a murmur3 finaliser, the same in
//!   every waypoint replica, so they agree); no key (header, cookie or query parameter absent
//!   and no cookie generated) hashes a random number, as Envoy does. A ring has
//!   `ceil(minimumRingSize / n)` points per endpoint rounded up to a power of two (Envoy does
//!   not round; rounding keeps every endpoint's points when another joins or leaves, so only
//!   that endpoint's keys move; the ring is 1 to 2 times the minimum size, at most 8M points),
//!   each `hash("<addr>_<i>")`; a key takes the first point at or after its hash. A Maglev table
//!   (prime size) is filled by Envoy's permutation algorithm from each endpoint's
//!   `hash(addr)` offset and skip. Tables cover all endpoints of a priority; a key whose
//!   endpoint is not usable walks on (next ring point / next table slot) to a usable one, so
//!   keys of healthy endpoints never move when another is ejected.
//! - `httpCookie`: with a `ttl` and no cookie in the request, a value is generated from the
//!   client address (as Envoy does, so racing requests of one connection agree) and returned
//!   as `name="value"; Max-Age=<ttl s>; Path=<path>; <attributes>; HttpOnly` (`Max-Age` left
//!   out for a zero ttl: a session cookie); the key is the value, so the cookie's next
//!   request lands on the same endpoint. Without a `ttl` nothing is generated.
//!
//! # Locality
//!
//! When locality failover is active (Istio: locality LB enabled, outlier detection set and no
//! `distribute`, even one that does not match the caller), endpoints fall in priorities against
//! the caller (the waypoint): 0 same region/zone/subzone, 1 same region/zone, 2 same region,
//! 3 other regions, 4 other regions than a `failover` rule's `to` for the caller's region
//! (`applyLocalityFailover`); with `failoverPriority` labels the
//! priority is first by how many leading labels match the caller's (`applyFailoverPriorities`),
//! then by locality when `failover` is also set. Traffic goes to priorities by Envoy's
//! priority load with overprovisioning factor 1.4: a priority takes
//! `min(100, 140 × usable/total)` percent and the rest spills to the next, normalised when all
//! together take less than 100. `distribute` (Istio `applyLocalityWeights`): for the first rule
//! whose `from` matches the caller, each locality takes its `to` weight (split over localities a
//! pattern matches by their endpoint counts; more specific patterns first), scaled by its usable
//! share ×1.4 (at most 1), and localities no pattern matches get nothing; consistent hashing
//! ignores these weights but not the exclusions.
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::routing::traffic_policy::{CookieSpec, EffectivePolicy, HashKey, HashTable, LbAlgorithm, LocalityLb};

/// Envoy's default overprovisioning factor, in percent.
const OVERPROVISIONING: u64 = 140;
/// Envoy's `maximum_ring_size` default.
const MAX_RING_POINTS: u64 = 8 * 1024 * 1024;
/// Seeds of the Maglev offset and skip hashes, and of generated cookie values.
const MAGLEV_OFFSET_SEED: u64 = 0;
const MAGLEV_SKIP_SEED: u64 = 1;
const COOKIE_SEED: u64 = 2;
/// Topology labels Istio puts on endpoints and proxies from their locality.
const REGION_LABEL: &str = "topology.kubernetes.io/region";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// Where a workload runs (Kubernetes topology labels; empty when unknown).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// `region/zone/subzone`.
    pub fn new(region: &str, zone: &str, subzone: &str) -> Self {
        Locality { region: region.into(), zone: zone.into(), subzone: subzone.into() }
    }

    /// Istio's `LocalityMatch`: `region[/zone[/subzone]]`, `*` or a missing part matching any.
    fn matches(&self, rule: &str) -> bool {
        let mut parts = rule.splitn(3, '/');
        let (r, z, s) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        (r == "*" || r == self.region)
            && (z == "*" || z.is_empty() || z == self.zone)
            && (s == "*" || s.is_empty() || s == self.subzone)
    }
}

/// One endpoint as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbEndpoint {
    /// Endpoint IP and target port; also its identity for consistent hashing.
    pub addr: SocketAddr,
    pub locality: Locality,
    /// Workload labels (for `failoverPriority`).
    pub labels: BTreeMap<String, String>,
}

impl LbEndpoint {
    /// An endpoint without labels.
    pub fn new(addr: SocketAddr, locality: Locality) -> Self {
        LbEndpoint { addr, locality, labels: BTreeMap::new() }
    }
}

/// The waypoint itself: endpoints are ordered by locality and labels against it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub locality: Locality,
    pub labels: BTreeMap<String, String>,
}

/// A label of an endpoint or the caller: topology labels come from the locality.
fn label<'a>(labels: &'a BTreeMap<String, String>, locality: &'a Locality, name: &str) -> Option<&'a str> {
    match name {
        REGION_LABEL => Some(&locality.region),
        ZONE_LABEL => Some(&locality.zone),
        SUBZONE_LABEL => Some(&locality.subzone),
        _ => labels.get(name).map(String::as_str),
    }
}

/// What the balancer may read of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub headers: &'a http::HeaderMap,
    /// Path with query (`/a?u=1`).
    pub path: &'a str,
    /// The client as the waypoint knows it (the original source of the tunnel).
    pub source: SocketAddr,
    /// The endpoint the client addressed, when it addressed one (for `PASSTHROUGH`).
    pub target: Option<SocketAddr>,
}

/// A chosen endpoint.
#[derive(Debug)]
pub struct Pick {
    /// Index into [`Balancer::endpoints`].
    pub index: usize,
    pub addr: SocketAddr,
    /// A `Set-Cookie` value for the response (generated `httpCookie`).
    pub set_cookie: Option<String>,
    /// Counts the request in flight to the endpoint until dropped.
    pub in_flight: InFlight,
}

/// One request in flight to an endpoint; dropping it ends the request for LEAST_REQUEST.
#[derive(Debug)]
pub struct InFlight {
    counts: Arc<[AtomicU32]>,
    index: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counts[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A consistent-hash table over the endpoints of one priority.
#[derive(Debug)]
enum Table {
    /// Sorted point hashes and the endpoint owning each.
    Ring { points: Vec<u64>, owners: Vec<u32> },
    /// Endpoint per slot (prime length).
    Maglev { slots: Vec<u32> },
}

impl Table {
    fn build(kind: HashTable, members: &[u32], endpoints: &[LbEndpoint]) -> Table {
        match kind {
            HashTable::Ring { minimum_ring_size } => ring(minimum_ring_size, members, endpoints),
            HashTable::Maglev { table_size } => maglev(table_size, members, endpoints),
        }
    }

    /// The endpoint for `hash`, walking on past endpoints that are not usable.
    fn lookup(&self, hash: u64, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
        let (start, len) = match self {
            Table::Ring { points, .. } => (points.partition_point(|p| *p < hash), points.len()),
            Table::Maglev { slots } => ((hash % slots.len().max(1) as u64) as usize, slots.len()),
        };
        (0..len).map(|i| (start + i) % len).map(|i| self.owner(i)).find(|&e| usable(e))
    }

    fn owner(&self, i: usize) -> usize {
        match self {
            Table::Ring { owners, .. } => owners[i] as usize,
            Table::Maglev { slots } => slots[i] as usize,
        }
    }
}

fn ring(minimum: u64, members: &[u32], endpoints: &[LbEndpoint]) -> Table {
    if members.is_empty() {
        return Table::Ring { points: Vec::new(), owners: Vec::new() };
    }
    let n = members.len() as u64;
    // A power of two: the count (hence every point) stays the same as endpoints come and go,
    // except across a power of two, so a change moves only the keys of the changed endpoint.
    let per = minimum.div_ceil(n).next_power_of_two().clamp(1, (MAX_RING_POINTS / n).max(1));
    let mut entries: Vec<(u64, u32)> = Vec::with_capacity((per * n) as usize);
    for &m in members {
        let addr = endpoints[m as usize].addr.to_string();
        for i in 0..per {
            entries.push((hash64(format!("{addr}_{i}").as_bytes(), 0), m));
        }
    }
    entries.sort_unstable();
    let (points, owners) = entries.into_iter().unzip();
    Table::Ring { points, owners }
}

fn maglev(size: u64, members: &[u32], endpoints: &[LbEndpoint]) -> Table {
    if members.is_empty() {
        return Table::Maglev { slots: Vec::new() };
    }
    // Validated config is prime; anything else would leave slots unreachable (no end to the fill).
    let size = next_prime(size.max(2));
    const EMPTY: u32 = u32::MAX;
    let mut slots = vec![EMPTY; size as usize];
    let perms: Vec<(u64, u64)> = members
        .iter()
        .map(|&m| {
            let a = endpoints[m as usize].addr.to_string();
            (hash64(a.as_bytes(), MAGLEV_OFFSET_SEED) % size, hash64(a.as_bytes(), MAGLEV_SKIP_SEED) % (size - 1) + 1)
        })
        .collect();
    let mut next = vec![0u64; members.len()];
    let mut filled = 0u64;
    'fill: loop {
        for (k, &m) in members.iter().enumerate() {
            let (offset, skip) = perms[k];
            loop {
                let c = ((offset + next[k] * skip) % size) as usize;
                next[k] += 1;
                if slots[c] == EMPTY {
                    slots[c] = m;
                    filled += 1;
                    break;
                }
            }
            if filled == size {
                break 'fill;
            }
        }
    }
    Table::Maglev { slots }
}

/// The smallest prime at or above `n` (trial division; table sizes are small).
fn next_prime(mut n: u64) -> u64 {
    while (2..).take_while(|f: &u64| f * f <= n).any(|f| n.is_multiple_of(f)) {
        n += 1;
    }
    n
}

/// A stable 64-bit hash (FNV-1a, murmur3 finaliser): the same in every process.
pub fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Endpoints of one priority, grouped by locality with their `distribute` weights.
#[derive(Debug)]
struct Priority {
    members: Vec<u32>,
    /// `(weight, endpoints)` per locality; empty: no `distribute` applies.
    groups: Vec<(u32, Vec<u32>)>,
    table: Option<Table>,
}

/// Load balancing over one endpoint list for one policy and caller, built once.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Vec<LbEndpoint>,
    algorithm: LbAlgorithm,
    locality: LocalityLb,
    caller: Caller,
    priorities: Vec<Priority>,
    next: AtomicUsize,
    in_flight: Arc<[AtomicU32]>,
}

impl Balancer {
    /// Builds priorities, locality weights and hash tables for `endpoints` under `policy`
    /// (its `load_balancer` and `locality`), as seen from `caller`.
    pub fn new(policy: &EffectivePolicy, endpoints: Vec<LbEndpoint>, caller: &Caller) -> Self {
        let locality = policy.locality.clone();
        let distribute = distribute_weights(&locality, &endpoints, caller);
        let levels: Vec<u32> = match distribute {
            Some(_) => vec![0; endpoints.len()],
            None => endpoints.iter().map(|e| priority_of(e, caller, &locality)).collect(),
        };
        let mut distinct: Vec<u32> = levels.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let table_kind = match &policy.load_balancer {
            LbAlgorithm::ConsistentHash(h) => Some(h.table),
            _ => None,
        };
        let priorities = distinct
            .iter()
            .map(|&level| {
                let members: Vec<u32> = (0..endpoints.len() as u32)
                    .filter(|&i| levels[i as usize] == level)
                    .filter(|&i| distribute.as_ref().is_none_or(|w| w[i as usize].is_some()))
                    .collect();
                let groups = match &distribute {
                    None => Vec::new(),
                    Some(w) => {
                        let mut by: BTreeMap<&Locality, (u32, Vec<u32>)> = BTreeMap::new();
                        for &m in &members {
                            let g = by.entry(&endpoints[m as usize].locality).or_default();
                            g.0 = w[m as usize].unwrap_or(0);
                            g.1.push(m);
                        }
                        by.into_values().collect()
                    }
                };
                let table = table_kind.map(|k| Table::build(k, &members, &endpoints));
                Priority { members, groups, table }
            })
            .collect();
        let in_flight: Arc<[AtomicU32]> = (0..endpoints.len()).map(|_| AtomicU32::new(0)).collect();
        Balancer {
            endpoints,
            algorithm: policy.load_balancer.clone(),
            locality,
            caller: caller.clone(),
            priorities,
            next: AtomicUsize::new(0),
            in_flight,
        }
    }

    /// The endpoints, in the order given.
    pub fn endpoints(&self) -> &[LbEndpoint] {
        &self.endpoints
    }

    /// Requests in flight to endpoint `index` (guards not yet dropped).
    pub fn in_flight(&self, index: usize) -> u32 {
        self.in_flight[index].load(Ordering::Relaxed)
    }

    /// The priority (0 preferred) each endpoint was put in.
    pub fn priority(&self, index: usize) -> Option<usize> {
        self.priorities.iter().position(|p| p.members.contains(&(index as u32)))
    }

    /// Chooses an endpoint for `req` among those `usable` (`usable[i]` for endpoint `i`; a
    /// missing entry counts as usable). `None`: nothing usable.
    pub fn pick(&self, req: &RequestView, usable: &[bool], rng: &mut fastrand::Rng) -> Option<Pick> {
        let ok = |i: usize| usable.get(i).copied().unwrap_or(true);
        let (index, set_cookie) = match &self.algorithm {
            LbAlgorithm::Passthrough => {
                let named = req.target.and_then(|t| self.endpoints.iter().position(|e| e.addr == t));
                (named.or_else(|| (0..self.endpoints.len()).find(|&i| ok(i)))?, None)
            }
            LbAlgorithm::ConsistentHash(h) => {
                let (key, set_cookie) = hash_key(&h.key, req);
                let hash = key.unwrap_or_else(|| rng.u64(..));
                let p = self.choose_priority(hash % 100, &ok)?;
                let i = p.table.as_ref()?.lookup(hash, &ok)?;
                (i, set_cookie)
            }
            algorithm => {
                let p = self.choose_priority(rng.u64(..100), &ok)?;
                let candidates: Vec<usize> = if p.groups.is_empty() {
                    p.members.iter().map(|&m| m as usize).filter(|&m| ok(m)).collect()
                } else {
                    choose_group(&p.groups, &ok, rng)?
                };
                (self.choose(algorithm, &candidates, rng)?, None)
            }
        };
        self.in_flight[index].fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight { counts: self.in_flight.clone(), index };
        Some(Pick { index, addr: self.endpoints[index].addr, set_cookie, in_flight })
    }

    fn choose(&self, algorithm: &LbAlgorithm, candidates: &[usize], rng: &mut fastrand::Rng) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let n = candidates.len();
        Some(match algorithm {
            LbAlgorithm::RoundRobin => candidates[self.next.fetch_add(1, Ordering::Relaxed) % n],
            LbAlgorithm::Random => candidates[rng.usize(..n)],
            _ => {
                let (a, b) = (candidates[rng.usize(..n)], candidates[rng.usize(..n)]);
                if self.in_flight(b) < self.in_flight(a) {
                    b
                } else {
                    a
                }
            }
        })
    }

    /// Envoy's priority load: `draw` in 0..100 against each priority's share.
    fn choose_priority(&self, draw: u64, ok: &dyn Fn(usize) -> bool) -> Option<&Priority> {
        // One priority (no locality failover) takes all the load while any member is healthy:
        // what the shares below come to, without building them for every request.
        if let [only] = self.priorities.as_slice() {
            return only.members.iter().any(|&m| ok(m as usize)).then_some(only);
        }
        let health: Vec<u64> = self
            .priorities
            .iter()
            .map(|p| {
                let total = p.members.len() as u64;
                let healthy = p.members.iter().filter(|&&m| ok(m as usize)).count() as u64;
                (OVERPROVISIONING * healthy).checked_div(total).unwrap_or(0).min(100)
            })
            .collect();
        let normalized = health.iter().sum::<u64>().min(100);
        if normalized == 0 {
            return None;
        }
        let mut remaining = 100u64;
        let mut loads: Vec<u64> = health
            .iter()
            .map(|h| {
                let l = (h * 100 / normalized).min(remaining);
                remaining -= l;
                l
            })
            .collect();
        if let Some(first) = loads.iter().position(|l| *l > 0) {
            loads[first] += remaining;
        }
        let mut acc = 0;
        for (p, l) in self.priorities.iter().zip(&loads) {
            acc += l;
            if draw < acc {
                return Some(p);
            }
        }
        None
    }

    /// Whether this balancer was built from exactly these inputs.
    fn built_from(&self, policy: &EffectivePolicy, endpoints: &[LbEndpoint], caller: &Caller) -> bool {
        self.algorithm == policy.load_balancer
            && self.locality == policy.locality
            && self.caller == *caller
            && self.endpoints == endpoints
    }
}

/// A locality group by effective weight (`distribute` weight × usable share × 1.4, at most
/// the weight); its usable endpoints.
fn choose_group(groups: &[(u32, Vec<u32>)], ok: &dyn Fn(usize) -> bool, rng: &mut fastrand::Rng) -> Option<Vec<usize>> {
    let usable: Vec<Vec<usize>> =
        groups.iter().map(|(_, m)| m.iter().map(|&i| i as usize).filter(|&i| ok(i)).collect()).collect();
    let weights: Vec<u64> = groups
        .iter()
        .zip(&usable)
        .map(|((w, m), u)| {
            let share = (OVERPROVISIONING * u.len() as u64 * 1000 / m.len().max(1) as u64 / 100).min(1000);
            u64::from(*w) * share
        })
        .collect();
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return None;
    }
    let mut draw = rng.u64(..total);
    for (w, u) in weights.iter().zip(usable) {
        if draw < *w {
            return Some(u);
        }
        draw -= w;
    }
    None
}

/// The priority of `e` for `caller` (before renumbering), per Istio's locality failover.
fn priority_of(e: &LbEndpoint, caller: &Caller, l: &LocalityLb) -> u32 {
    // Istio applies `distribute` or failover, never both: a `distribute` that does not match
    // the caller leaves one priority.
    if !l.failover_active || !l.distribute.is_empty() {
        return 0;
    }
    let mut p = 0;
    if !l.failover_priority.is_empty() {
        p = label_priority(e, caller, &l.failover_priority);
        if l.failover.is_empty() {
            return p;
        }
    }
    p * 5 + locality_priority(&caller.locality, &e.locality, &l.failover)
}

/// Istio's `applyFailoverPriorityPerLocality`: `len - j` for the first label `j` that differs
/// from the caller's (or from the `name=value` override), 0 when all match.
fn label_priority(e: &LbEndpoint, caller: &Caller, names: &[String]) -> u32 {
    for (j, entry) in names.iter().enumerate() {
        let (name, want) = match entry.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (entry.as_str(), label(&caller.labels, &caller.locality, entry)),
        };
        if want != label(&e.labels, &e.locality, name) {
            return (names.len() - j) as u32;
        }
    }
    0
}

/// Istio's `LbPriority` plus `failover` rules (`applyLocalityFailover`).
fn locality_priority(caller: &Locality, e: &Locality, failover: &[(String, String)]) -> u32 {
    if caller.region == e.region {
        return if caller.zone != e.zone {
            2
        } else if caller.subzone != e.subzone {
            1
        } else {
            0
        };
    }
    match failover.iter().find(|(from, _)| *from == caller.region) {
        Some((_, to)) if *to != e.region => 4,
        _ => 3,
    }
}

/// Per endpoint, its locality's `distribute` weight (`None`: excluded), or `None` overall
/// when no `distribute` rule matches the caller.
fn distribute_weights(l: &LocalityLb, endpoints: &[LbEndpoint], caller: &Caller) -> Option<Vec<Option<u32>>> {
    if !l.enabled {
        return None;
    }
    let (_, to) = l.distribute.iter().find(|(from, _)| caller.locality.matches(from))?;
    let mut counts: BTreeMap<&Locality, u64> = BTreeMap::new();
    for e in endpoints {
        *counts.entry(&e.locality).or_default() += 1;
    }
    let mut to: Vec<&(String, u32)> = to.iter().collect();
    let specific = |p: &str| p.split('/').filter(|s| *s != "*").count();
    to.sort_by(|a, b| specific(&b.0).cmp(&specific(&a.0)).then(a.0.cmp(&b.0)));
    let mut weight: BTreeMap<&Locality, u32> = BTreeMap::new();
    for (pattern, w) in to {
        let matched: Vec<(&Locality, u64)> = counts
            .iter()
            .filter(|(loc, _)| !weight.contains_key(*loc) && loc.matches(pattern))
            .map(|(l, c)| (*l, *c))
            .collect();
        let total: u64 = matched.iter().map(|(_, c)| c).sum();
        for (loc, c) in matched {
            weight.insert(loc, (c * u64::from(*w)).div_ceil(total) as u32);
        }
    }
    Some(endpoints.iter().map(|e| weight.get(&e.locality).copied()).collect())
}

/// The request's hash key, and a `Set-Cookie` when one was generated.
fn hash_key(key: &HashKey, req: &RequestView) -> (Option<u64>, Option<String>) {
    match key {
        HashKey::Header(name) => {
            let mut values: Vec<&[u8]> = req.headers.get_all(name.as_str()).iter().map(|v| v.as_bytes()).collect();
            values.sort_unstable();
            let h = values.iter().fold(None, |h: Option<u64>, v| Some(hash64(v, h.unwrap_or(0))));
            (h, None)
        }
        HashKey::SourceIp => (Some(hash64(req.source.ip().to_string().as_bytes(), 0)), None),
        HashKey::QueryParameter(name) => (query_param(req.path, name).map(|v| hash64(v.as_bytes(), 0)), None),
        HashKey::Cookie(spec) => match cookie(req.headers, &spec.name) {
            Some(v) => (Some(hash64(v.as_bytes(), 0)), None),
            None => match spec.ttl {
                None => (None, None),
                Some(_) => {
                    let value = format!("{:016x}", hash64(req.source.to_string().as_bytes(), COOKIE_SEED));
                    (Some(hash64(value.as_bytes(), 0)), Some(set_cookie(spec, &value)))
                }
            },
        },
    }
}

/// The first value of query parameter `name` (raw, not percent-decoded).
fn query_param<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = path.split_once('?')?;
    query.split('&').map(|kv| kv.split_once('=').unwrap_or((kv, ""))).find(|(k, _)| *k == name).map(|(_, v)| v)
}

/// The value of cookie `name` in the `Cookie` headers, surrounding quotes removed.
fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v))
}

/// Envoy's `makeSetCookieValue` order: value, Max-Age, Path, attributes, HttpOnly.
fn set_cookie(spec: &CookieSpec, value: &str) -> String {
    let mut out = format!("{}=\"{value}\"", spec.name);
    let secs = spec.ttl.map(|t| t.as_secs()).unwrap_or(0);
    if secs > 0 {
        out.push_str(&format!("; Max-Age={secs}"));
    }
    if let Some(p) = &spec.path {
        out.push_str(&format!("; Path={p}"));
    }
    for (n, v) in &spec.attributes {
        match v.as_deref().filter(|v| !v.is_empty()) {
            Some(v) => out.push_str(&format!("; {n}={v}")),
            None => out.push_str(&format!("; {n}")),
        }
    }
    out.push_str("; HttpOnly");
    out
}

/// Which balancer: a service (hostname), a subset of it (or all of it) and a service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterKey {
    pub service: String,
    pub subset: Option<String>,
    pub port: u16,
}

/// Balancers per cluster, each kept while its endpoint list, policy and caller are unchanged,
/// so tables are built once per endpoint-set change and round-robin / in-flight state lasts.
#[derive(Debug, Default)]
pub struct Balancers {
    map: Mutex<HashMap<ClusterKey, Arc<Balancer>>>,
}

impl Balancers {
    /// The balancer of `key`, built anew when `policy`, `endpoints` or `caller` differ from
    /// what the cached one was built from (a comparison of the lists: O(endpoints)).
    pub fn get(
        &self,
        key: &ClusterKey,
        policy: &EffectivePolicy,
        endpoints: &[LbEndpoint],
        caller: &Caller,
    ) -> Arc<Balancer> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(key).filter(|b| b.built_from(policy, endpoints, caller)) {
            return b.clone();
        }
        let b = Arc::new(Balancer::new(policy, endpoints.to_vec(), caller));
        map.insert(key.clone(), b.clone());
        b
    }

    /// Drops the balancers of clusters `keep` rejects (services gone).
    pub fn retain(&self, keep: impl Fn(&ClusterKey) -> bool) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| keep(k));
    }

    /// Number of cached balancers.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[path = "lb_tests.rs"]
mod tests;
