//! A traffic policy resolved for one (host, subset, port): what the waypoint applies, every
//! default filled in.
use std::time::Duration;

use super::shape::{H2UpgradePolicy, TlsMode};
use super::{resolve, Level};
use super::{
    DEFAULT_BASE_EJECTION_TIME, DEFAULT_CONNECT_TIMEOUT, DEFAULT_CONSECUTIVE_5XX, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_EJECTION_PERCENT, DEFAULT_MAX_EJECTION_TIME, DEFAULT_OUTLIER_INTERVAL,
};

/// What applies to requests for one (host, subset, port), every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectivePolicy {
    pub load_balancer: LbAlgorithm,
    pub locality: LocalityLb,
    pub connection_pool: PoolLimits,
    /// `None`: no outlier detection (nothing is ever ejected).
    pub outlier: Option<OutlierPolicy>,
    /// `None`: the DestinationRule sets no `tls` (the waypoint's HBONE mTLS applies).
    pub tls: Option<TlsMode>,
}

impl Default for EffectivePolicy {
    /// The policy of a host no DestinationRule covers.
    fn default() -> Self {
        resolve(Level::default())
    }
}

/// How an endpoint is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum LbAlgorithm {
    RoundRobin,
    /// Power of two choices over in-flight requests (Envoy's default `choice_count` 2).
    LeastRequest,
    Random,
    /// The address the client asked for, no balancing.
    Passthrough,
    ConsistentHash(HashPolicy),
}

/// A consistent-hash policy: where the key comes from and which table maps it.
#[derive(Debug, Clone, PartialEq)]
pub struct HashPolicy {
    pub key: HashKey,
    pub table: HashTable,
}

/// The request property hashed.
#[derive(Debug, Clone, PartialEq)]
pub enum HashKey {
    /// A header (name lower-cased).
    Header(String),
    Cookie(CookieSpec),
    SourceIp,
    QueryParameter(String),
}

/// The `httpCookie` hash key, and the cookie generated when a request has none.
#[derive(Debug, Clone, PartialEq)]
pub struct CookieSpec {
    pub name: String,
    pub path: Option<String>,
    /// `None`: no cookie is generated. `Some(ZERO)`: a session cookie (no `Max-Age`).
    pub ttl: Option<Duration>,
    /// Extra `; name[=value]` attributes of a generated cookie.
    pub attributes: Vec<(String, Option<String>)>,
}

/// The consistent-hash table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashTable {
    Ring {
        minimum_ring_size: u64,
    },
    /// `table_size` is prime.
    Maglev {
        table_size: u64,
    },
}

/// Locality-aware load balancing, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalityLb {
    /// `enabled: false` turns locality awareness off entirely.
    pub enabled: bool,
    /// Weighted split (`from` pattern, then `to` pattern → weight); when it matches the
    /// caller, failover does not apply.
    pub distribute: Vec<(String, Vec<(String, u32)>)>,
    /// Region failover rules, `(from, to)`.
    pub failover: Vec<(String, String)>,
    /// Label names (optionally `name=value`) ordering endpoints by how many leading labels
    /// match the caller's.
    pub failover_priority: Vec<String>,
    /// Whether endpoints are put in failover priorities at all: Istio does so only when
    /// outlier detection is configured (otherwise traffic would never fail over).
    pub failover_active: bool,
}

impl Default for LocalityLb {
    /// Istio's mesh default: enabled, no rules, no failover without outlier detection.
    fn default() -> Self {
        LocalityLb {
            enabled: true,
            distribute: Vec::new(),
            failover: Vec::new(),
            failover_priority: Vec::new(),
            failover_active: false,
        }
    }
}

/// `connectionPool`, resolved: circuit-breaker limits and connection settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolLimits {
    pub max_connections: u32,
    pub connect_timeout: Duration,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    /// `None`: unlimited.
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: u32,
    /// `None`: connections never time out idle.
    pub idle_timeout: Option<Duration>,
    pub h2_upgrade_policy: H2UpgradePolicy,
    pub use_client_protocol: bool,
}

impl Default for PoolLimits {
    /// Istio's circuit-breaker thresholds and timeouts with no `connectionPool`.
    fn default() -> Self {
        PoolLimits {
            max_connections: u32::MAX,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_pending_requests: u32::MAX,
            max_requests: u32::MAX,
            max_requests_per_connection: None,
            max_retries: u32::MAX,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            h2_upgrade_policy: H2UpgradePolicy::Default,
            use_client_protocol: false,
        }
    }
}

/// `outlierDetection`, resolved with Envoy's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierPolicy {
    /// `None`: consecutive 5xx never eject.
    pub consecutive_5xx: Option<u32>,
    /// `None`: consecutive gateway errors never eject.
    pub consecutive_gateway: Option<u32>,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    /// Cap on one ejection: max(300s, base).
    pub max_ejection_time: Duration,
    /// 0..=100.
    pub max_ejection_percent: u32,
    /// 0..=100; below it, ejections are ignored (Envoy's panic threshold).
    pub min_health_percent: u32,
}

impl Default for OutlierPolicy {
    /// An `outlierDetection: {}` block.
    fn default() -> Self {
        OutlierPolicy {
            consecutive_5xx: Some(DEFAULT_CONSECUTIVE_5XX),
            consecutive_gateway: None,
            interval: DEFAULT_OUTLIER_INTERVAL,
            base_ejection_time: DEFAULT_BASE_EJECTION_TIME,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
            min_health_percent: 0,
        }
    }
}
