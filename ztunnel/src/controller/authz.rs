//! Istio's translation of `AuthorizationPolicy` and `PeerAuthentication` into the L4 `Authorization` resources a
//! node proxy enforces, following istiod's ambient code (`pilot/pkg/serviceregistry/ambient/authorization.go` and
//! `policies.go`) so that a policy means the same here as under istiod:
//!
//! - Scope: a `selector` makes a workload-selector policy (listed by the matching workloads); none makes a
//!   namespace policy, or a global one in the root namespace. Policies with `targetRef(s)` are for waypoints and
//!   produce nothing for ztunnel.
//! - Actions: ALLOW and DENY. AUDIT and CUSTOM are rejected ("ztunnel does not support the X action").
//! - Each rule becomes one rule of clauses: the `to` operations (ports) as one clause, the `from` sources as
//!   another, and one clause per `when` condition (`source.ip`, `source.namespace`, `source.principal`,
//!   `destination.ip`, `destination.port`).
//! - HTTP-level fields (hosts, methods, paths, request principals, remote IP blocks, any other `when` key) cannot
//!   be enforced by ztunnel: an ALLOW rule that uses them is dropped (it matches nothing), a DENY rule keeps only its
//!   L4 part (it matches more broadly; a clause left with only empty matches never matches). The object is still
//!   applied, with Istio's warning text.
//! - PeerAuthentication: once any exists, the static policy `<root>/istio_converted_static_strict` (DENY when the
//!   peer has no identity) is sent, and every workload whose effective mode (mesh, then namespace, then workload
//!   policy; the oldest of each level wins) is STRICT lists it. Workload policies with port-level modes become
//!   `<ns>/converted_peer_authentication_<name>` exactly as istiod merges them.
//!
//! Unlike istiod, which trusts its validating webhook, invalid values (a port that is not a number, an IP block
//! that does not parse, a condition without values) reject the object here with a reason: there is no webhook in
//! front of a directory of files.
use std::collections::BTreeMap;

use crate::policy::{Authorization, Cidr, Clause, Match, PolicyAction, PolicyScope, Rule};
use crate::policy::{ServiceAccountMatch, StringMatch};

use super::objects::{AuthorizationPolicy, AuthorizationRule, IntOrStringKey, PeerAuthentication, StringMap};

/// Name of the policy that denies plaintext (no peer identity) to workloads under STRICT mTLS.
pub const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";
/// Prefix of the policies converted from PeerAuthentications with port-level modes.
pub const CONVERTED_PEER_AUTHENTICATION_PREFIX: &str = "converted_peer_authentication_";
/// Annotation that makes a policy dry-run (logged, never enforced).
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// What an AuthorizationPolicy becomes for ztunnel.
#[derive(Debug, Clone, PartialEq)]
pub enum Converted {
    /// Bound to a waypoint with `targetRef(s)`: enforced there, nothing for ztunnel.
    ForWaypoint,
    /// An L4 policy, and a warning when it is not exactly what was written (HTTP rules, bad dry-run value).
    Policy { authorization: Authorization, selector: Option<StringMap>, warning: Option<String> },
}

/// Converts one AuthorizationPolicy living in `namespace`; `Err` is the reason it is rejected.
pub fn convert_authorization_policy(
    ap: &AuthorizationPolicy,
    namespace: &str,
    root_namespace: &str,
) -> Result<Converted, String> {
    let spec = &ap.spec;
    let targeted = spec.target_ref.is_some() || !spec.target_refs.is_empty();
    if targeted && spec.selector.is_some() {
        return Err("only one of targetRef(s) and selector may be set".into());
    }
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => PolicyAction::Allow,
        "DENY" => PolicyAction::Deny,
        other @ ("AUDIT" | "CUSTOM") if !targeted => {
            return Err(format!("ztunnel does not support the {other} action"));
        }
        "AUDIT" | "CUSTOM" => PolicyAction::Allow, // for a waypoint; not translated
        other => return Err(format!("invalid action {other:?} (ALLOW, DENY, AUDIT or CUSTOM)")),
    };
    let mut warnings = Vec::new();
    let dry_run = match ap.metadata.annotations.get(DRY_RUN_ANNOTATION) {
        None => false,
        Some(v) => parse_go_bool(v).unwrap_or_else(|| {
            warnings.push(format!("invalid {DRY_RUN_ANNOTATION} annotation {v:?}: policy enforced"));
            false
        }),
    };
    // Validate every rule even for waypoint policies: a typo must be reported wherever it is enforced.
    let mut rules = Vec::new();
    let mut l7_fields: Vec<&'static str> = Vec::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let (clauses, l7) = convert_rule(rule, namespace).map_err(|e| format!("rules[{i}].{e}"))?;
        for f in &l7 {
            if !l7_fields.contains(f) {
                l7_fields.push(f);
            }
        }
        // L7 rules never match for ALLOW; for DENY the L4 remainder is kept.
        if action == PolicyAction::Deny || l7.is_empty() {
            rules.push(clauses);
        }
    }
    if targeted {
        return Ok(Converted::ForWaypoint);
    }
    let scope = match &spec.selector {
        Some(_) => PolicyScope::WorkloadSelector,
        None if namespace == root_namespace => PolicyScope::Global,
        None => PolicyScope::Namespace,
    };
    if !l7_fields.is_empty() {
        l7_fields.sort_unstable();
        let boilerplate = match action {
            PolicyAction::Deny if !has_effective_rules(&rules) => HTTP_DENY_NO_EFFECT,
            PolicyAction::Deny => HTTP_DENY_MIXED,
            PolicyAction::Allow => HTTP_ALLOW_RULE,
        };
        warnings.push(format!(
            "ztunnel does not support HTTP attributes (found: {}). In ambient mode you must use a waypoint proxy to \
             enforce HTTP rules. {boilerplate}",
            l7_fields.join(", ")
        ));
    }
    let authorization = Authorization {
        name: ap.metadata.name.clone(),
        namespace: namespace.to_string(),
        scope,
        action,
        rules,
        dry_run,
    };
    let selector = spec.selector.as_ref().map(|s| s.match_labels.clone());
    let warning = (!warnings.is_empty()).then(|| warnings.join("; "));
    Ok(Converted::Policy { authorization, selector, warning })
}

const HTTP_DENY_NO_EFFECT: &str = "After omitting unsupported HTTP attributes, this DENY policy has no enforceable \
    rules at ztunnel and will have no effect. Deploy a waypoint proxy and use a targetRef to enforce this policy.";
const HTTP_DENY_MIXED: &str = "DENY policy with HTTP attributes is enforced without the HTTP rules. \
    This will be more restrictive than requested.";
const HTTP_ALLOW_RULE: &str =
    "Within an ALLOW policy, rules matching HTTP attributes are omitted. This will be more restrictive than requested.";

/// `when` keys ztunnel can evaluate.
const L4_CONDITION_KEYS: &[&str] =
    &["source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"];

/// One rule → clauses (Istio's `handleRule`), plus the HTTP-level fields it used.
fn convert_rule(rule: &AuthorizationRule, namespace: &str) -> Result<(Rule, Vec<&'static str>), String> {
    let mut l7 = Vec::new();
    let mut clauses: Vec<Clause> = Vec::new();
    let mut to_matches = Vec::new();
    for (i, to) in rule.to.iter().enumerate() {
        let op = &to.operation;
        let at = |f: &str| format!("to[{i}].operation.{f}");
        for (set, name) in [
            (&op.hosts, "hosts"),
            (&op.not_hosts, "notHosts"),
            (&op.methods, "methods"),
            (&op.not_methods, "notMethods"),
            (&op.paths, "paths"),
            (&op.not_paths, "notPaths"),
        ] {
            if !set.is_empty() {
                l7.push(name);
            }
        }
        to_matches.push(Match {
            destination_ports: ports(&op.ports, &at("ports"))?,
            not_destination_ports: ports(&op.not_ports, &at("notPorts"))?,
            ..Match::default()
        });
    }
    let mut from_matches = Vec::new();
    for (i, from) in rule.from.iter().enumerate() {
        let s = &from.source;
        let at = |f: &str| format!("from[{i}].source.{f}");
        for (set, name) in [
            (&s.remote_ip_blocks, "remoteIpBlocks"),
            (&s.not_remote_ip_blocks, "notRemoteIpBlocks"),
            (&s.request_principals, "requestPrincipals"),
            (&s.not_request_principals, "notRequestPrincipals"),
        ] {
            if !set.is_empty() {
                l7.push(name);
            }
        }
        from_matches.push(Match {
            source_ips: cidrs(&s.ip_blocks, &at("ipBlocks"))?,
            not_source_ips: cidrs(&s.not_ip_blocks, &at("notIpBlocks"))?,
            namespaces: string_matches(&s.namespaces),
            not_namespaces: string_matches(&s.not_namespaces),
            service_accounts: service_accounts(&s.service_accounts, namespace, &at("serviceAccounts"))?,
            not_service_accounts: service_accounts(&s.not_service_accounts, namespace, &at("notServiceAccounts"))?,
            principals: string_matches(&s.principals),
            not_principals: string_matches(&s.not_principals),
            ..Match::default()
        });
    }
    if !to_matches.is_empty() {
        clauses.push(to_matches);
    }
    if !from_matches.is_empty() {
        clauses.push(from_matches);
    }
    for (i, when) in rule.when.iter().enumerate() {
        let at = format!("when[{i}]");
        if when.key.is_empty() {
            return Err(format!("{at}.key: must not be empty"));
        }
        if when.values.is_empty() && when.not_values.is_empty() {
            return Err(format!("{at}: at least one of values or notValues must be set"));
        }
        let (values, not_values) = (&when.values, &when.not_values);
        let mut m = Match::default();
        match when.key.as_str() {
            "source.namespace" => {
                (m.namespaces, m.not_namespaces) = (string_matches(values), string_matches(not_values))
            }
            "source.principal" => {
                (m.principals, m.not_principals) = (string_matches(values), string_matches(not_values))
            }
            "source.ip" => {
                m.source_ips = cidrs(values, &format!("{at}.values"))?;
                m.not_source_ips = cidrs(not_values, &format!("{at}.notValues"))?;
            }
            "destination.ip" => {
                m.destination_ips = cidrs(values, &format!("{at}.values"))?;
                m.not_destination_ips = cidrs(not_values, &format!("{at}.notValues"))?;
            }
            "destination.port" => {
                m.destination_ports = ports(values, &format!("{at}.values"))?;
                m.not_destination_ports = ports(not_values, &format!("{at}.notValues"))?;
            }
            _ => l7.push(l7_condition_name(&when.key)),
        }
        debug_assert!(L4_CONDITION_KEYS.contains(&when.key.as_str()) || m == Match::default());
        clauses.push(vec![m]);
    }
    Ok((clauses, l7))
}

/// A stable name for an HTTP-level `when` key in the warning (keys such as `request.headers[x]` vary).
fn l7_condition_name(key: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "request.headers",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "request.auth.claims",
        "request.regex.headers",
        "request.experimental.regex.headers",
        "remote.ip",
        "destination.port.name",
        "connection.sni",
        "experimental.envoy.filters",
    ];
    let base = key.split('[').next().unwrap_or(key);
    KNOWN.iter().find(|k| **k == base).copied().unwrap_or("when")
}

/// Istio's `stringToMatch`: `*` presence, `*x` suffix, `x*` prefix, otherwise exact.
fn string_matches(values: &[String]) -> Vec<StringMatch> {
    values.iter().map(|v| StringMatch::from_pattern(v)).collect()
}

fn ports(values: &[String], at: &str) -> Result<Vec<u16>, String> {
    values
        .iter()
        .map(|v| v.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("{at}: invalid port {v:?}")))
        .collect()
}

fn cidrs(values: &[String], at: &str) -> Result<Vec<Cidr>, String> {
    values.iter().map(|v| v.parse::<Cidr>().map_err(|_| format!("{at}: invalid IP or CIDR {v:?}"))).collect()
}

/// `ns/sa`, or `sa` in the policy's namespace (Istio's `stringToServiceAccountMatch`).
fn service_accounts(values: &[String], namespace: &str, at: &str) -> Result<Vec<ServiceAccountMatch>, String> {
    values
        .iter()
        .map(|v| {
            let (ns, sa) = v.split_once('/').unwrap_or((namespace, v));
            if ns.is_empty() || sa.is_empty() || sa.contains('/') {
                return Err(format!("{at}: invalid service account {v:?} (<namespace>/<name> or <name>)"));
            }
            Ok(ServiceAccountMatch { namespace: ns.to_string(), service_account: sa.to_string() })
        })
        .collect()
}

/// Whether some rule can still fire at ztunnel: a rule with no clauses matches everything; a clause whose matches
/// are all empty is skipped by ztunnel, so the rule holding it never fires.
fn has_effective_rules(rules: &[Rule]) -> bool {
    rules.iter().any(|r| r.is_empty() || r.iter().all(|c| c.iter().any(|m| *m != Match::default())))
}

/// Go's `strconv.ParseBool`, which istiod uses for the dry-run annotation.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// An mTLS mode of a PeerAuthentication (UNSET inherits from the level above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

/// A validated PeerAuthentication.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerAuthn {
    pub namespace: String,
    pub name: String,
    /// `None` (or empty labels, which istiod treats the same): namespace-wide, or mesh-wide in the root namespace.
    pub selector: Option<StringMap>,
    pub mode: MtlsMode,
    pub port_level: BTreeMap<u32, MtlsMode>,
    /// Creation timestamp, then load order: the oldest policy of a level wins.
    pub age: (String, usize),
}

impl PeerAuthn {
    fn workload_level(&self) -> bool {
        self.selector.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// Whether it applies to a workload with `labels` in `namespace` (Istio's `fetchPeerAuthentications`).
    pub fn applies_to(&self, namespace: &str, labels: &StringMap, root_namespace: &str) -> bool {
        if self.namespace == namespace {
            return self.selector.as_ref().is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)));
        }
        self.namespace == root_namespace && self.selector.is_none()
    }
}

fn mode(v: Option<&str>, at: &str) -> Result<MtlsMode, String> {
    match v.unwrap_or("UNSET") {
        "UNSET" => Ok(MtlsMode::Unset),
        "DISABLE" => Ok(MtlsMode::Disable),
        "PERMISSIVE" => Ok(MtlsMode::Permissive),
        "STRICT" => Ok(MtlsMode::Strict),
        other => Err(format!("{at}: invalid mode {other:?} (UNSET, DISABLE, PERMISSIVE or STRICT)")),
    }
}

/// Validates a PeerAuthentication; `order` is its position in load order.
pub fn parse_peer_authentication(pa: &PeerAuthentication, namespace: &str, order: usize) -> Result<PeerAuthn, String> {
    let spec = &pa.spec;
    let selector = spec.selector.as_ref().map(|s| s.match_labels.clone());
    if !spec.port_level_mtls.is_empty() && selector.as_ref().is_none_or(|s| s.is_empty()) {
        return Err("portLevelMtls requires a workload selector".into());
    }
    let mut port_level = BTreeMap::new();
    for (key, m) in &spec.port_level_mtls {
        let port = match key {
            IntOrStringKey::Int(n) => u32::try_from(*n).ok(),
            IntOrStringKey::String(s) => s.parse::<u32>().ok(),
        }
        .filter(|p| (1..=65535).contains(p))
        .ok_or_else(|| format!("portLevelMtls: invalid port {key:?}"))?;
        port_level.insert(port, mode(m.mode.as_deref(), &format!("portLevelMtls[{port}].mode"))?);
    }
    Ok(PeerAuthn {
        namespace: namespace.to_string(),
        name: pa.metadata.name.clone(),
        selector,
        mode: mode(spec.mtls.as_ref().and_then(|m| m.mode.as_deref()), "mtls.mode")?,
        port_level,
        age: (pa.metadata.creation_timestamp.clone().unwrap_or_default(), order),
    })
}

/// The policy sent once any PeerAuthentication exists: DENY connections without a peer identity.
pub fn static_strict_policy(root_namespace: &str) -> Authorization {
    Authorization {
        name: STATIC_STRICT_POLICY.into(),
        namespace: root_namespace.into(),
        scope: PolicyScope::WorkloadSelector,
        action: PolicyAction::Deny,
        rules: vec![vec![vec![deny_plaintext()]]],
        dry_run: false,
    }
}

fn deny_plaintext() -> Match {
    Match { not_principals: vec![StringMatch::Presence], ..Match::default() }
}

fn oldest<'a>(it: impl Iterator<Item = &'a PeerAuthn>) -> Option<&'a PeerAuthn> {
    it.min_by(|a, b| a.age.cmp(&b.age))
}

/// The namespace-level (no selector) policy of `namespace` that is in force: the oldest.
fn namespace_level<'a>(all: &'a [PeerAuthn], namespace: &str) -> Option<&'a PeerAuthn> {
    oldest(all.iter().filter(|p| p.namespace == namespace && !p.workload_level()))
}

/// Istio's `convertPeerAuthentication`: a workload policy with port-level modes becomes a DENY policy, merged with
/// the STRICT mode it inherits; `None` when the static STRICT policy (or nothing) covers it.
pub fn convert_peer_authentication(pa: &PeerAuthn, all: &[PeerAuthn], root_namespace: &str) -> Option<Authorization> {
    if pa.namespace == root_namespace || pa.selector.is_none() || pa.port_level.is_empty() {
        return None;
    }
    let ns = namespace_level(all, &pa.namespace).map(|p| p.mode);
    let root = namespace_level(all, root_namespace).map(|p| p.mode);
    let strict = |m: Option<MtlsMode>| m == Some(MtlsMode::Strict);
    let unset = |m: Option<MtlsMode>| m.is_none() || m == Some(MtlsMode::Unset);
    let mode = pa.mode;
    let mut clauses: Vec<Clause> = Vec::new();
    let mut rules: Vec<Rule> = Vec::new();
    if mode == MtlsMode::Strict {
        clauses.push(vec![deny_plaintext()]);
    }
    let mut found_non_strict = false;
    for (&port, &port_mode) in &pa.port_level {
        match port_mode {
            MtlsMode::Strict => {
                // Enforced by the parent already (Go's operator precedence reproduced: `a || b && c || d`).
                let inherited =
                    mode == MtlsMode::Strict || (mode == MtlsMode::Unset && strict(ns)) || (unset(ns) && strict(root));
                if inherited {
                    continue;
                }
                let port = u16::try_from(port).expect("validated port");
                rules.push(vec![vec![Match { destination_ports: vec![port], ..deny_plaintext() }]]);
            }
            MtlsMode::Permissive | MtlsMode::Disable => {
                if mode == MtlsMode::Permissive || mode == MtlsMode::Disable {
                    continue;
                }
                if mode == MtlsMode::Unset
                    && ((ns.is_some() && !strict(ns))
                        || (ns.is_none() && root.is_some() && !strict(root))
                        || (ns.is_none() && root.is_none()))
                {
                    continue;
                }
                found_non_strict = true;
                let port = u16::try_from(port).expect("validated port");
                clauses.push(vec![Match { not_destination_ports: vec![port], ..Match::default() }]);
            }
            MtlsMode::Unset => {}
        }
    }
    if mode == MtlsMode::Strict && !found_non_strict {
        return None;
    }
    if clauses.is_empty() && rules.is_empty() {
        return None;
    }
    let merge_strict = (strict(root) && (ns.is_none() || unset(ns) || strict(ns))) || strict(ns);
    if merge_strict && found_non_strict {
        clauses.push(vec![deny_plaintext()]);
    }
    if !clauses.is_empty() {
        rules.push(clauses);
    }
    Some(Authorization {
        name: format!("{CONVERTED_PEER_AUTHENTICATION_PREFIX}{}", pa.name),
        namespace: pa.namespace.clone(),
        scope: PolicyScope::WorkloadSelector,
        action: PolicyAction::Deny,
        rules,
        dry_run: false,
    })
}

/// Istio's `convertedSelectorPeerAuthentications`: the PeerAuthentication-derived policy keys a workload lists,
/// given the PeerAuthentications that apply to it.
pub fn workload_peer_authn_keys(applicable: &[&PeerAuthn], root_namespace: &str) -> Vec<String> {
    let level = |mesh: bool, workload: bool| {
        oldest(
            applicable
                .iter()
                .copied()
                .filter(|p| p.workload_level() == workload && (p.namespace == root_namespace) == mesh),
        )
    };
    let (mesh, namespace, workload) = (level(true, false), level(false, false), level(false, true));
    let mut strict = mesh.is_some_and(|p| p.mode == MtlsMode::Strict);
    if let Some(ns) = namespace.filter(|p| p.mode != MtlsMode::Unset) {
        strict = ns.mode == MtlsMode::Strict;
    }
    let mut port_key = None;
    if let Some(w) = workload {
        match w.mode {
            MtlsMode::Strict => strict = true,
            MtlsMode::Permissive | MtlsMode::Disable => strict = false,
            MtlsMode::Unset => {}
        }
        if !w.port_level.is_empty() {
            let key = format!("{}/{CONVERTED_PEER_AUTHENTICATION_PREFIX}{}", w.namespace, w.name);
            let any = |f: fn(MtlsMode) -> bool| w.port_level.values().any(|m| f(*m));
            match w.mode {
                MtlsMode::Strict => {
                    if any(|m| matches!(m, MtlsMode::Permissive | MtlsMode::Disable)) {
                        port_key = Some(key);
                        strict = false;
                    }
                }
                MtlsMode::Permissive | MtlsMode::Disable => {
                    if any(|m| m == MtlsMode::Strict) {
                        port_key = Some(key);
                    }
                }
                MtlsMode::Unset if strict => {
                    if any(|m| m == MtlsMode::Permissive) {
                        port_key = Some(key);
                        strict = false;
                    }
                }
                MtlsMode::Unset => {
                    strict = false;
                    if any(|m| m == MtlsMode::Strict) {
                        port_key = Some(key);
                    }
                }
            }
        }
    }
    let mut keys = Vec::new();
    if strict {
        keys.push(format!("{root_namespace}/{STATIC_STRICT_POLICY}"));
    }
    keys.extend(port_key);
    keys.sort();
    keys
}
