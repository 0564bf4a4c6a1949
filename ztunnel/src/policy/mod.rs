//! L4 authorization with the semantics of Istio ztunnel (`rbac.rs` and `assert_rbac`), so a policy written for
//! Istio decides the same here:
//! - a workload selected by a policy entry that could not be read denies everything (fail closed);
//! - an enforced DENY that matches denies;
//! - with no enforced ALLOW the connection is allowed, otherwise one of them must match;
//! - dry-run policies are evaluated and logged but never change the decision.
//!
//! A policy matches when any of its rules matches; a rule when all of its clauses match; a clause when any of its
//! non-empty matches matches; a match when every field it sets holds (see [`Match`]).
mod matcher;
mod parse;

pub use matcher::{
    Authorization, Cidr, CidrError, Clause, InvalidPolicy, Match, PolicyAction, PolicyScope, Rule, ServiceAccountMatch,
    StringMatch,
};
pub use parse::{parse_policy, PolicyError};

use std::net::{IpAddr, SocketAddr};

use tracing::{debug, info};

use crate::identity::Identity;

/// The reason given when ALLOW policies apply and none of them matches (Istio's wording).
const NOT_ALLOWED: &str = "allow policies exist, but none allowed";

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

/// Everything [`evaluate`] needs: the policies in force and the entries that were rejected (which fail closed).
/// Plain slices of policies convert into it, with no rejected entries.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policies<'a> {
    pub valid: &'a [Authorization],
    pub invalid: &'a [InvalidPolicy],
}

impl<'a> From<&'a [Authorization]> for Policies<'a> {
    fn from(valid: &'a [Authorization]) -> Self {
        Policies { valid, invalid: &[] }
    }
}

impl<'a> From<&'a Vec<Authorization>> for Policies<'a> {
    fn from(valid: &'a Vec<Authorization>) -> Self {
        Policies { valid, invalid: &[] }
    }
}

impl<'a, const N: usize> From<&'a [Authorization; N]> for Policies<'a> {
    fn from(valid: &'a [Authorization; N]) -> Self {
        Policies { valid, invalid: &[] }
    }
}

/// The destination workload as policy sees it: the policy engine needs only these facts,
/// so it does not depend on the state store (which depends on it for parsing).
#[derive(Debug, Clone, Copy)]
pub struct PolicyTarget<'a> {
    /// Workload uid, for logs.
    pub uid: &'a str,
    /// Namespace-scoped policies of this namespace apply.
    pub namespace: &'a str,
    /// Policies that select the workload directly, as `"<namespace>/<name>"`.
    pub selected_by: &'a [String],
}

/// Evaluates `policies` for a connection to `workload`.
pub fn evaluate<'a>(
    policies: impl Into<Policies<'a>>,
    workload: &PolicyTarget<'_>,
    facts: &ConnectionFacts,
) -> Decision {
    let policies = policies.into();
    if let Some(bad) = policies.invalid.iter().find(|p| p.applies_to(workload)) {
        return Decision::Deny(format!(
            "policy {} is invalid, denying all connections until it is fixed: {}",
            bad.key(),
            bad.reason
        ));
    }
    let selected: Vec<&Authorization> = policies.valid.iter().filter(|p| p.applies_to(workload)).collect();
    let enforced: Vec<&Authorization> = selected.iter().copied().filter(|p| !p.dry_run).collect();
    let decision = decide(&enforced, facts);
    if selected.len() != enforced.len() {
        log_dry_run(&selected, &decision, workload, facts);
    }
    decision
}

/// Istio's order: a matching DENY wins; no ALLOW means allowed; otherwise some ALLOW must match.
fn decide(policies: &[&Authorization], facts: &ConnectionFacts) -> Decision {
    if let Some(p) = policies.iter().find(|p| p.action == PolicyAction::Deny && p.matches(facts)) {
        return Decision::Deny(format!("explicitly denied by: {}", p.key()));
    }
    let mut allows = policies.iter().filter(|p| p.action == PolicyAction::Allow).peekable();
    if allows.peek().is_none() || allows.any(|p| p.matches(facts)) {
        Decision::Allow
    } else {
        Decision::Deny(NOT_ALLOWED.into())
    }
}

/// Reports what the dry-run policies would have done: at info when enforcing them would change the decision,
/// at debug otherwise. Never affects the decision.
fn log_dry_run(selected: &[&Authorization], decision: &Decision, workload: &PolicyTarget<'_>, facts: &ConnectionFacts) {
    let src = facts.source_identity.as_ref().map(|i| i.to_string());
    for p in selected.iter().filter(|p| p.dry_run) {
        let matched = p.matches(facts);
        debug!(policy = %p.key(), action = ?p.action, matched, workload = %workload.uid, ?src,
            src_ip = %facts.source_ip, dst = %facts.destination, "dry-run policy evaluated");
    }
    let would = decide(selected, facts);
    if &would != decision {
        info!(workload = %workload.uid, ?src, src_ip = %facts.source_ip, dst = %facts.destination,
            actual = ?decision, would = ?would, "dry-run policies would change the decision");
    }
}

#[cfg(test)]
mod tests;
