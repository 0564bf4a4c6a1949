//! Policy documents (Istio local-config shape) and how one matches a connection.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::ConnectionFacts;
use crate::state::Workload;

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// One authorization policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub scope: PolicyScope,
    pub action: PolicyAction,
    /// OR of rules. An ALLOW policy with no rules matches nothing; a DENY with no rules
    /// matches nothing either (as Istio).
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// AND of clauses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub clauses: Vec<Clause>,
}

/// OR of matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Clause {
    #[serde(default)]
    pub matches: Vec<Match>,
}

/// AND of the fields that are set. Principals are `td/ns/<ns>/sa/<sa>` (or full SPIFFE
/// URIs) with `*` allowed as a prefix or suffix wildcard; IPs are CIDRs or bare addresses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub source_ips: Vec<String>,
    #[serde(default)]
    pub not_source_ips: Vec<String>,
    #[serde(default)]
    pub destination_ips: Vec<String>,
    #[serde(default)]
    pub not_destination_ips: Vec<String>,
    #[serde(default)]
    pub destination_ports: Vec<u16>,
    #[serde(default)]
    pub not_destination_ports: Vec<u16>,
}

impl Authorization {
    /// Checks CIDRs and names so a bad policy is rejected when loaded, not when matched.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.namespace.is_empty() {
            return Err("name and namespace are required".into());
        }
        for m in self.rules.iter().flat_map(|r| &r.clauses).flat_map(|c| &c.matches) {
            for c in m.source_ips.iter().chain(&m.not_source_ips).chain(&m.destination_ips).chain(&m.not_destination_ips) {
                parse_cidr(c).ok_or_else(|| format!("invalid CIDR {c:?}"))?;
            }
        }
        Ok(())
    }

    /// Whether the policy is in scope for `w`.
    pub fn applies_to(&self, w: &Workload) -> bool {
        match self.scope {
            PolicyScope::Global => true,
            PolicyScope::Namespace => self.namespace == w.namespace,
            PolicyScope::WorkloadSelector => {
                let key = format!("{}/{}", self.namespace, self.name);
                w.authorization_policies.contains(&key)
            }
        }
    }

    /// Whether any rule matches the connection.
    pub fn matches(&self, f: &ConnectionFacts) -> bool {
        self.rules.iter().any(|r| !r.clauses.is_empty() && r.clauses.iter().all(|c| c.matches.iter().any(|m| m.matches(f))))
    }
}

impl Match {
    fn matches(&self, f: &ConnectionFacts) -> bool {
        let ns = f.source_identity.as_ref().map(|i| i.namespace().to_string());
        let principal = f.source_identity.as_ref().map(|i| {
            let uri = i.to_string();
            uri.strip_prefix("spiffe://").map(str::to_string).unwrap_or(uri)
        });
        let dst_port = f.destination.port();
        let in_str = |list: &[String], v: &Option<String>| v.as_ref().is_some_and(|v| list.iter().any(|p| wildcard(p, v)));
        let in_ip = |list: &[String], ip: IpAddr| list.iter().any(|c| parse_cidr(c).is_some_and(|(net, len)| contains(net, len, ip)));
        let pos = |set: bool, ok: bool| !set || ok;
        pos(!self.namespaces.is_empty(), in_str(&self.namespaces, &ns))
            && !in_str(&self.not_namespaces, &ns)
            && pos(!self.principals.is_empty(), in_str(&self.principals, &principal))
            && !in_str(&self.not_principals, &principal)
            && pos(!self.source_ips.is_empty(), in_ip(&self.source_ips, f.source_ip))
            && !in_ip(&self.not_source_ips, f.source_ip)
            && pos(!self.destination_ips.is_empty(), in_ip(&self.destination_ips, f.destination.ip()))
            && !in_ip(&self.not_destination_ips, f.destination.ip())
            && pos(!self.destination_ports.is_empty(), self.destination_ports.contains(&dst_port))
            && !self.not_destination_ports.contains(&dst_port)
    }
}

/// Istio string match: exact, `*` (presence), `prefix*`, `*suffix`. A full SPIFFE URI
/// pattern matches the same as its trust-domain-relative form.
fn wildcard(pattern: &str, value: &str) -> bool {
    let pattern = pattern.strip_prefix("spiffe://").unwrap_or(pattern);
    if pattern == "*" {
        true
    } else if let Some(p) = pattern.strip_suffix('*') {
        value.starts_with(p)
    } else if let Some(s) = pattern.strip_prefix('*') {
        value.ends_with(s)
    } else {
        pattern == value
    }
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    match s.split_once('/') {
        Some((ip, len)) => {
            let ip: IpAddr = ip.parse().ok()?;
            let len: u8 = len.parse().ok()?;
            (len <= if ip.is_ipv4() { 32 } else { 128 }).then_some((ip, len))
        }
        None => {
            let ip: IpAddr = s.parse().ok()?;
            Some((ip, if ip.is_ipv4() { 32 } else { 128 }))
        }
    }
}

fn contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    let canon = |a: IpAddr| match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        a => a,
    };
    match (canon(net), canon(ip)) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len as u32) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len as u32) };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}
