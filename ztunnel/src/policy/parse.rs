//! Reads one policy entry of the local config into the policy model. Two shapes are accepted so that Istio's own
//! local-config files and this project's existing ones both load:
//! - Istio's: `rules` is a list of lists of lists of matches, strings are `!Exact x` / `!Prefix x` / `!Suffix x` /
//!   `!Presence []`, every key present;
//! - ours: `rules: [{clauses: [{matches: [...]}]}]`, plain strings (`*` presence, `x*` prefix, `*x` suffix),
//!   optional `scope` (Namespace) and `dryRun` (false), bare IPs.
//!
//! Anything unexpected is an error rather than ignored: a misread policy must fail closed, never open.
use serde_yaml_ng::{Mapping, Value};

use super::matcher::{Authorization, Cidr, Clause, InvalidPolicy, Match, PolicyAction, PolicyScope, Rule};
use super::matcher::{ServiceAccountMatch, StringMatch};

/// What is wrong with a policy entry, and where (`rules[0][1][0].sourceIps[2]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{}expected {expected}", at(.path))]
    WrongType { path: String, expected: &'static str },
    #[error("{}missing field `{field}`", at(.path))]
    Missing { path: String, field: &'static str },
    #[error("{}unknown field `{field}`", at(.path))]
    UnknownField { path: String, field: String },
    #[error("{}invalid {what} {value:?}", at(.path))]
    Invalid { path: String, what: &'static str, value: String },
}

fn at(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

/// Parses a policy entry, or describes it as an [`InvalidPolicy`] built from whatever could still be read.
pub fn parse_policy(v: &Value) -> Result<Authorization, InvalidPolicy> {
    policy(v).map_err(|e| {
        let text = |k: &str| v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
        InvalidPolicy {
            namespace: text("namespace"),
            name: text("name"),
            scope: v.get("scope").and_then(|s| scope(s).ok()),
            reason: e.to_string(),
        }
    })
}

const POLICY_KEYS: &[&str] = &["name", "namespace", "scope", "action", "rules", "dryRun"];
const MATCH_KEYS: &[&str] = &[
    "namespaces",
    "notNamespaces",
    "principals",
    "notPrincipals",
    "serviceAccounts",
    "notServiceAccounts",
    "sourceIps",
    "notSourceIps",
    "destinationIps",
    "notDestinationIps",
    "destinationPorts",
    "notDestinationPorts",
];

fn policy(v: &Value) -> Result<Authorization, PolicyError> {
    let m = mapping(v, "", POLICY_KEYS)?;
    let name = required_text(m, "name")?;
    let namespace = required_text(m, "namespace")?;
    let scope = m.get("scope").map(scope).transpose()?.unwrap_or_default();
    let action = action(m.get("action").ok_or(PolicyError::Missing { path: String::new(), field: "action" })?)?;
    let dry_run = match m.get("dryRun") {
        None => false,
        Some(v) => v.as_bool().ok_or(PolicyError::WrongType { path: "dryRun".into(), expected: "true or false" })?,
    };
    let rules = match m.get("rules") {
        None => vec![],
        Some(v) => sequence(v, "rules")?
            .iter()
            .enumerate()
            .map(|(i, r)| rule(r, &format!("rules[{i}]"), &namespace))
            .collect::<Result<_, _>>()?,
    };
    Ok(Authorization { name, namespace, scope, action, rules, dry_run })
}

fn required_text(m: &Mapping, key: &'static str) -> Result<String, PolicyError> {
    let v = m.get(key).ok_or(PolicyError::Missing { path: String::new(), field: key })?;
    Some(text(v, key)?)
        .filter(|s| !s.is_empty())
        .ok_or(PolicyError::WrongType { path: key.into(), expected: "a non-empty string" })
}

fn scope(v: &Value) -> Result<PolicyScope, PolicyError> {
    match v.as_str() {
        Some("Global") => Ok(PolicyScope::Global),
        Some("Namespace") => Ok(PolicyScope::Namespace),
        Some("WorkloadSelector") => Ok(PolicyScope::WorkloadSelector),
        _ => Err(invalid("scope", "scope (Global, Namespace or WorkloadSelector)", v)),
    }
}

fn action(v: &Value) -> Result<PolicyAction, PolicyError> {
    match v.as_str() {
        Some("Allow") => Ok(PolicyAction::Allow),
        Some("Deny") => Ok(PolicyAction::Deny),
        _ => Err(invalid("action", "action (Allow or Deny)", v)),
    }
}

/// A rule is a list of clauses (Istio) or `{clauses: [...]}` (ours).
fn rule(v: &Value, path: &str, policy_ns: &str) -> Result<Rule, PolicyError> {
    let (clauses, path) = nested(v, path, "clauses")?;
    clauses.iter().enumerate().map(|(i, c)| clause(c, &format!("{path}[{i}]"), policy_ns)).collect()
}

/// A clause is a list of matches (Istio) or `{matches: [...]}` (ours).
fn clause(v: &Value, path: &str, policy_ns: &str) -> Result<Clause, PolicyError> {
    let (matches, path) = nested(v, path, "matches")?;
    matches.iter().enumerate().map(|(i, m)| match_group(m, &format!("{path}[{i}]"), policy_ns)).collect()
}

/// One level of nesting: a plain list (Istio), or a mapping holding the list under `key` (ours; absent = empty).
/// Returns the items and the path they live at.
fn nested<'v>(v: &'v Value, path: &str, key: &'static str) -> Result<(&'v [Value], String), PolicyError> {
    if let Value::Sequence(items) = v {
        return Ok((items, path.to_string()));
    }
    let m = mapping(v, path, &[key])?;
    let path = format!("{path}.{key}");
    let items = m.get(key).map(|l| sequence(l, &path)).transpose()?.unwrap_or_default();
    Ok((items, path))
}

fn match_group(v: &Value, path: &str, policy_ns: &str) -> Result<Match, PolicyError> {
    let m = mapping(v, path, MATCH_KEYS)?;
    let list = |key: &str| -> Result<Vec<(String, &Value)>, PolicyError> {
        let field = format!("{path}.{key}");
        let items = m.get(key).map(|l| sequence(l, &field)).transpose()?.unwrap_or_default();
        Ok(items.iter().enumerate().map(|(i, item)| (format!("{field}[{i}]"), item)).collect())
    };
    let strings = |key: &str, principal: bool| -> Result<Vec<StringMatch>, PolicyError> {
        list(key)?.into_iter().map(|(p, v)| string_match(v, &p, principal)).collect()
    };
    let accounts = |key: &str| -> Result<Vec<ServiceAccountMatch>, PolicyError> {
        list(key)?.into_iter().map(|(p, v)| service_account(v, &p, policy_ns)).collect()
    };
    let cidrs = |key: &str| -> Result<Vec<Cidr>, PolicyError> {
        list(key)?.into_iter().map(|(p, v)| text(v, &p)?.parse().map_err(|_| invalid(&p, "CIDR", v))).collect()
    };
    let ports = |key: &str| -> Result<Vec<u16>, PolicyError> {
        let port = |(p, v): (String, &Value)| {
            v.as_u64().and_then(|n| u16::try_from(n).ok()).ok_or_else(|| invalid(&p, "port", v))
        };
        list(key)?.into_iter().map(port).collect()
    };
    Ok(Match {
        namespaces: strings("namespaces", false)?,
        not_namespaces: strings("notNamespaces", false)?,
        principals: strings("principals", true)?,
        not_principals: strings("notPrincipals", true)?,
        service_accounts: accounts("serviceAccounts")?,
        not_service_accounts: accounts("notServiceAccounts")?,
        source_ips: cidrs("sourceIps")?,
        not_source_ips: cidrs("notSourceIps")?,
        destination_ips: cidrs("destinationIps")?,
        not_destination_ips: cidrs("notDestinationIps")?,
        destination_ports: ports("destinationPorts")?,
        not_destination_ports: ports("notDestinationPorts")?,
    })
}

/// `!Exact x` (also `{Exact: x}`, as config_dump's JSON writes it) or a plain pattern. A plain principal pattern
/// may be a full `spiffe://` URI; it is compared without the scheme, as Istio's principals are.
fn string_match(v: &Value, path: &str, principal: bool) -> Result<StringMatch, PolicyError> {
    match v {
        Value::String(s) if principal => Ok(StringMatch::from_pattern(s.strip_prefix("spiffe://").unwrap_or(s))),
        Value::String(s) => Ok(StringMatch::from_pattern(s)),
        Value::Tagged(t) => tagged_match(t.tag.to_string().trim_start_matches('!'), &t.value, path),
        Value::Mapping(m) if m.len() == 1 => {
            let (k, inner) = m.iter().next().expect("one entry");
            tagged_match(k.as_str().unwrap_or_default(), inner, path)
        }
        _ => {
            Err(PolicyError::WrongType { path: path.into(), expected: "a string or !Exact/!Prefix/!Suffix/!Presence" })
        }
    }
}

fn tagged_match(kind: &str, v: &Value, path: &str) -> Result<StringMatch, PolicyError> {
    match kind {
        "Exact" => Ok(StringMatch::Exact(text(v, path)?)),
        "Prefix" => Ok(StringMatch::Prefix(text(v, path)?)),
        "Suffix" => Ok(StringMatch::Suffix(text(v, path)?)),
        "Presence" => match v {
            Value::Null => Ok(StringMatch::Presence),
            Value::Sequence(s) if s.is_empty() => Ok(StringMatch::Presence),
            Value::String(s) if s.is_empty() => Ok(StringMatch::Presence),
            _ => Err(PolicyError::WrongType { path: path.into(), expected: "`!Presence []`" }),
        },
        _ => Err(PolicyError::Invalid { path: path.into(), what: "string match kind", value: kind.into() }),
    }
}

/// `{namespace, serviceAccount}` (Istio), or `"ns/sa"` / `"sa"` (the policy's namespace) as istiod accepts them.
fn service_account(v: &Value, path: &str, policy_ns: &str) -> Result<ServiceAccountMatch, PolicyError> {
    let (namespace, service_account) = match v {
        Value::String(s) => match s.split_once('/') {
            Some((ns, sa)) => (ns.to_string(), sa.to_string()),
            None => (policy_ns.to_string(), s.clone()),
        },
        _ => {
            let m = mapping(v, path, &["namespace", "serviceAccount"])?;
            let get = |field: &'static str| {
                let v = m.get(field).ok_or_else(|| PolicyError::Missing { path: path.into(), field })?;
                text(v, &format!("{path}.{field}"))
            };
            (get("namespace")?, get("serviceAccount")?)
        }
    };
    if namespace.is_empty() || service_account.is_empty() || service_account.contains('/') {
        return Err(invalid(path, "service account", v));
    }
    Ok(ServiceAccountMatch { namespace, service_account })
}

fn mapping<'v>(v: &'v Value, path: &str, allowed: &[&str]) -> Result<&'v Mapping, PolicyError> {
    let m = v.as_mapping().ok_or_else(|| PolicyError::WrongType { path: path.into(), expected: "a mapping" })?;
    for k in m.keys() {
        let k = k.as_str().unwrap_or_default();
        if !allowed.contains(&k) {
            return Err(PolicyError::UnknownField { path: path.into(), field: k.into() });
        }
    }
    Ok(m)
}

/// A list; an explicit null is refused (a field that was meant to say something must not quietly say nothing).
fn sequence<'v>(v: &'v Value, path: &str) -> Result<&'v [Value], PolicyError> {
    v.as_sequence().map(Vec::as_slice).ok_or_else(|| PolicyError::WrongType { path: path.into(), expected: "a list" })
}

fn text(v: &Value, path: &str) -> Result<String, PolicyError> {
    v.as_str().map(str::to_string).ok_or_else(|| PolicyError::WrongType { path: path.into(), expected: "a string" })
}

fn invalid(path: &str, what: &'static str, v: &Value) -> PolicyError {
    let value = match v {
        Value::String(s) => s.clone(),
        other => serde_yaml_ng::to_string(other).unwrap_or_default().trim_end().to_string(),
    };
    PolicyError::Invalid { path: path.into(), what, value }
}
