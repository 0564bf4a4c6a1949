//! L4 authorization with the semantics of Istio's `authorization.proto` (as ztunnel
//! enforces it): DENY policies win, then if any ALLOW policy applies to the workload one
//! of them must match, otherwise the connection is allowed.
//!
//! A policy matches when any of its rules matches; a rule when all of its clauses match;
//! a clause when any of its matches matches; a match when every field it sets holds
//! (positive fields: the value is listed; `not*` fields: it is not).
mod matcher;

pub use matcher::{Authorization, Clause, Match, PolicyAction, PolicyScope, Rule};

use std::net::{IpAddr, SocketAddr};

use crate::identity::Identity;
use crate::state::Workload;

/// What the policy engine knows about a connection.
#[derive(Debug, Clone)]
pub struct ConnectionFacts {
    /// The client's authenticated identity (none for plaintext).
    pub source_identity: Option<Identity>,
    pub source_ip: IpAddr,
    pub destination: SocketAddr,
}

/// The verdict and, when denied, which policy (or the lack of an allowing one) decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(String),
}

impl Decision {
    /// Whether the connection may proceed.
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Evaluates `policies` for a connection to `workload`.
pub fn evaluate(policies: &[Authorization], workload: &Workload, facts: &ConnectionFacts) -> Decision {
    let applicable: Vec<&Authorization> = policies.iter().filter(|p| p.applies_to(workload)).collect();
    for p in applicable.iter().filter(|p| p.action == PolicyAction::Deny) {
        if p.matches(facts) {
            return Decision::Deny(format!("denied by policy {}/{}", p.namespace, p.name));
        }
    }
    let allows: Vec<&&Authorization> = applicable.iter().filter(|p| p.action == PolicyAction::Allow).collect();
    if allows.is_empty() || allows.iter().any(|p| p.matches(facts)) {
        Decision::Allow
    } else {
        Decision::Deny("no ALLOW policy matched".into())
    }
}

#[cfg(test)]
mod tests;
