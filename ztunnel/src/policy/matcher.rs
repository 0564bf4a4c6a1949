//! The one policy model both accepted YAML shapes are converted into, and how a policy selects workloads and
//! matches a connection. The semantics are those of Istio ztunnel's `rbac.rs`, so a policy behaves the same here
//! as it would there.
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::ser::{SerializeTupleVariant, Serializer};
use serde::Serialize;

use super::ConnectionFacts;
use super::PolicyTarget;
use crate::identity::Identity;

/// Which workloads a policy applies to (Istio's `Scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum PolicyScope {
    /// Every workload in the mesh (Istio: policies in the root namespace).
    Global,
    /// Every workload in the policy's namespace.
    #[default]
    Namespace,
    /// Only workloads that list the policy in `authorizationPolicies`.
    WorkloadSelector,
}

/// ALLOW or DENY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// AND of clauses. A rule with no clauses matches every connection.
pub type Rule = Vec<Clause>;

/// OR of matches. A clause with no matches matches every connection.
pub type Clause = Vec<Match>;

/// One authorization policy, in Istio's internal shape (rules → clauses → matches).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: PolicyAction,
    /// OR of rules. No rules means the policy never matches (an ALLOW then still counts as "ALLOW policies exist").
    pub rules: Vec<Rule>,
    /// Evaluated and logged, but never changes the decision.
    pub dry_run: bool,
}

/// How a namespace or principal is compared (Istio's `StringMatch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

/// A source service account; the trust domain is deliberately not part of it (as in Istio).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// An address block; a bare IP is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// AND of the fields that are set; a match with every field empty never matches (it is skipped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// Compared with `<td>/ns/<ns>/sa/<sa>` (no `spiffe://`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

/// A policy entry that could not be read. It is kept so that every workload it could have selected denies all
/// connections until it is fixed (fail closed): dropping it would silently lose a DENY or turn an ALLOW-only
/// workload into allow-all. `None` means the field itself could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InvalidPolicy {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub scope: Option<PolicyScope>,
    /// Why the entry was rejected.
    pub reason: String,
}

/// Whether `w` lists `namespace/name` in its `authorizationPolicies` (selects the policy whatever its scope).
fn listed(w: &PolicyTarget<'_>, namespace: &str, name: &str) -> bool {
    w.selected_by.iter().any(|k| k.split_once('/') == Some((namespace, name)))
}

impl Authorization {
    /// `"<namespace>/<name>"`, the key workloads list and denials name.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the policy is evaluated for `w`: its scope covers `w`, or `w` lists it.
    pub fn applies_to(&self, w: &PolicyTarget<'_>) -> bool {
        listed(w, &self.namespace, &self.name)
            || match self.scope {
                PolicyScope::Global => true,
                PolicyScope::Namespace => self.namespace == w.namespace,
                PolicyScope::WorkloadSelector => false,
            }
    }

    /// Whether any rule matches the connection.
    pub fn matches(&self, f: &ConnectionFacts) -> bool {
        let principal = f.source_identity.as_ref().map(principal_of);
        self.rules.iter().any(|rule| rule.iter().all(|clause| clause_matches(clause, f, principal.as_deref())))
    }
}

fn clause_matches(clause: &[Match], f: &ConnectionFacts, principal: Option<&str>) -> bool {
    clause.is_empty() || clause.iter().any(|m| !m.is_empty() && m.matches_with(f, principal))
}

/// The identity as Istio policies name it: `<td>/ns/<ns>/sa/<sa>`.
fn principal_of(id: &Identity) -> String {
    format!("{}/ns/{}/sa/{}", id.trust_domain(), id.namespace(), id.service_account())
}

/// Positive entries (if any) must hit, negative entries must not.
fn check<T>(positive: &[T], negative: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&hit)) && !negative.iter().any(&hit)
}

impl Match {
    /// True when no field is set; such a match is skipped rather than matching everything.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }

    /// Whether every field that is set holds for the connection. Identity fields never hit without an identity.
    pub fn matches(&self, f: &ConnectionFacts) -> bool {
        let principal = f.source_identity.as_ref().map(principal_of);
        self.matches_with(f, principal.as_deref())
    }

    fn matches_with(&self, f: &ConnectionFacts, principal: Option<&str>) -> bool {
        let id = f.source_identity.as_ref();
        let (dst_ip, dst_port) = (f.destination.ip(), f.destination.port());
        check(&self.namespaces, &self.not_namespaces, |m| id.is_some_and(|i| m.matches(i.namespace())))
            && check(&self.principals, &self.not_principals, |m| principal.is_some_and(|p| m.matches(p)))
            && check(&self.service_accounts, &self.not_service_accounts, |m| id.is_some_and(|i| m.matches(i)))
            && check(&self.source_ips, &self.not_source_ips, |c| c.contains(f.source_ip))
            && check(&self.destination_ips, &self.not_destination_ips, |c| c.contains(dst_ip))
            && check(&self.destination_ports, &self.not_destination_ports, |p| *p == dst_port)
    }
}

impl StringMatch {
    /// Istio's comparison: exact, prefix, suffix, or "present" (non-empty).
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }

    /// The project's plain-string form (istiod's translation): `*` presence, `*x` suffix, `x*` prefix, else exact.
    pub fn from_pattern(pattern: &str) -> Self {
        if pattern == "*" {
            StringMatch::Presence
        } else if let Some(s) = pattern.strip_prefix('*') {
            StringMatch::Suffix(s.to_string())
        } else if let Some(p) = pattern.strip_suffix('*') {
            StringMatch::Prefix(p.to_string())
        } else {
            StringMatch::Exact(pattern.to_string())
        }
    }
}

/// Serialized as Istio's local config writes it: `!Exact x` in YAML, `{"Exact": "x"}` in JSON.
impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StringMatch::Exact(v) => s.serialize_newtype_variant("StringMatch", 0, "Exact", v),
            StringMatch::Prefix(v) => s.serialize_newtype_variant("StringMatch", 1, "Prefix", v),
            StringMatch::Suffix(v) => s.serialize_newtype_variant("StringMatch", 2, "Suffix", v),
            StringMatch::Presence => s.serialize_tuple_variant("StringMatch", 3, "Presence", 0)?.end(),
        }
    }
}

impl ServiceAccountMatch {
    /// Same namespace and service account; the trust domain is ignored.
    pub fn matches(&self, id: &Identity) -> bool {
        self.namespace == id.namespace() && self.service_account == id.service_account()
    }
}

/// Why a CIDR string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {0:?}")]
pub struct CidrError(pub String);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CidrError(s.to_string());
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Cidr {
    /// Whether `ip` is in the block; IPv4-mapped IPv6 addresses count as their IPv4 form.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let canon = |a: IpAddr| match a {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
            a => a,
        };
        let (net, len) = match (self.addr, canon(self.addr)) {
            // A mapped network keeps its meaning for the IPv4 part.
            (IpAddr::V6(_), IpAddr::V4(v4)) => (IpAddr::V4(v4), self.prefix_len.saturating_sub(96)),
            (_, a) => (a, self.prefix_len),
        };
        match (net, canon(ip)) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

impl InvalidPolicy {
    /// `"<namespace>/<name>"`, with `?` for a part that could not be read.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace.as_deref().unwrap_or("?"), self.name.as_deref().unwrap_or("?"))
    }

    /// Whether `w` could be selected by the entry, judged from what could be read and erring on the side of yes:
    /// an unreadable namespace counts as Global; an unreadable scope, or a selector scope without a readable name,
    /// counts as Namespace; a workload listing `namespace/name` is always selected.
    pub fn applies_to(&self, w: &PolicyTarget<'_>) -> bool {
        let Some(ns) = self.namespace.as_deref() else {
            return true;
        };
        if self.name.as_deref().is_some_and(|name| listed(w, ns, name)) {
            return true;
        }
        match self.scope {
            Some(PolicyScope::Global) => true,
            Some(PolicyScope::WorkloadSelector) if self.name.is_some() => false,
            _ => ns == w.namespace,
        }
    }
}
