//! L7 authorization at the waypoint: Istio `AuthorizationPolicy` objects bound to a service
//! or to the waypoint with `targetRef(s)` (the ones node proxies leave alone), enforced per
//! HTTP request on principals, namespaces, methods, paths, hosts, ports and request headers.
//!
//! Semantics are Istio's: a matching DENY denies; when ALLOW policies apply, one must match;
//! a rule matches when all of `from`, `to` and `when` hold, each a list of alternatives.
//! Values match exactly, by `prefix*`, by `*suffix`, or `*` for anything present.
//!
//! A field this waypoint cannot enforce (JWT request principals, remote IP blocks, unknown
//! `when` keys, CUSTOM and AUDIT actions) rejects the object with its reason, and a target
//! whose policy was rejected (with no earlier valid version) denies every request: a policy
//! that cannot be read must never act as no policy.
use std::net::IpAddr;

use http::HeaderMap;

use crate::controller::objects::{AuthorizationPolicy, AuthorizationRule, Condition};
use crate::policy::Cidr;

/// What a policy is bound to: a Service, or the waypoint's Gateway (all its traffic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Service { namespace: String, name: String },
    Gateway { namespace: String, name: String },
}

/// One compiled L7 policy.
#[derive(Debug, Clone)]
pub struct L7Policy {
    /// `namespace/name`, for denial reasons and logs.
    pub name: String,
    deny: bool,
    pub targets: Vec<Target>,
    /// `None`: no `rules` at all (an ALLOW allows nothing, a DENY denies nothing).
    rules: Option<Vec<Rule>>,
}

#[derive(Debug, Clone, Default)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<When>,
}

#[derive(Debug, Clone, Default)]
struct Source {
    principals: Values,
    not_principals: Values,
    namespaces: Values,
    not_namespaces: Values,
    ip_blocks: Vec<Cidr>,
    not_ip_blocks: Vec<Cidr>,
}

#[derive(Debug, Clone, Default)]
struct Operation {
    hosts: Values,
    not_hosts: Values,
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    methods: Values,
    not_methods: Values,
    paths: Values,
    not_paths: Values,
}

#[derive(Debug, Clone)]
enum WhenKey {
    Header(String),
    SourcePrincipal,
    SourceNamespace,
    SourceIp,
    DestinationPort,
}

#[derive(Debug, Clone)]
struct When {
    key: WhenKey,
    values: Values,
    not_values: Values,
}

/// Istio's string patterns: exact, `prefix*`, `*suffix`, `*`.
#[derive(Debug, Clone, Default)]
struct Values(Vec<String>);

impl Values {
    /// Istio allows `*` alone, or one `*` at the start or the end: anything else would
    /// silently never match (and a DENY that never matches is an open door).
    fn new(v: Vec<String>) -> Result<Self, String> {
        for p in &v {
            let stars = p.matches('*').count();
            let ok = stars == 0 || p == "*" || (stars == 1 && (p.starts_with('*') || p.ends_with('*')));
            if !ok {
                return Err(format!("value {p:?}: `*` may only be a prefix, a suffix or the whole value"));
            }
        }
        Ok(Values(v))
    }

    fn any(&self, v: &str) -> bool {
        self.0.iter().any(|p| pattern_matches(p, v))
    }

    fn any_ignoring_case(&self, v: &str) -> bool {
        self.0.iter().any(|p| pattern_matches(&p.to_ascii_lowercase(), &v.to_ascii_lowercase()))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn pattern_matches(p: &str, v: &str) -> bool {
    if p == "*" {
        return true;
    }
    if let Some(prefix) = p.strip_suffix('*') {
        return v.starts_with(prefix);
    }
    if let Some(suffix) = p.strip_prefix('*') {
        return v.ends_with(suffix);
    }
    p == v
}

/// What policy sees of one request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The client's mTLS identity without `spiffe://` (`td/ns/<ns>/sa/<sa>`).
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    pub host: &'a str,
    /// The service port the client addressed.
    pub port: u16,
    pub headers: &'a HeaderMap,
    /// False for a raw TCP tunnel: HTTP fields (hosts, methods, paths, headers) are then
    /// unknown, so an ALLOW rule that needs them does not match and a DENY rule is held to
    /// its other fields (it matches more broadly), as Istio does for TCP.
    pub http: bool,
}

/// Compiles one AuthorizationPolicy of `namespace`: `Ok(None)` when it has no `targetRef(s)`
/// (a selector policy is the node proxies' to enforce).
pub fn compile(ap: &AuthorizationPolicy, namespace: &str) -> Result<Option<L7Policy>, String> {
    let spec = &ap.spec;
    let refs: Vec<&serde_yaml_ng::Value> = spec.target_ref.iter().chain(&spec.target_refs).collect();
    if refs.is_empty() {
        return Ok(None);
    }
    if spec.selector.is_some() {
        return Err("only one of targetRef(s) and selector may be set".into());
    }
    let deny = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => false,
        "DENY" => true,
        other => return Err(format!("the waypoint does not support the {other} action")),
    };
    if spec.provider.is_some() {
        return Err("provider is only for CUSTOM policies".into());
    }
    let targets = refs.iter().map(|r| target(r, namespace)).collect::<Result<_, _>>()?;
    let rules = match &spec.rules {
        None => None,
        Some(rules) => Some(
            rules
                .iter()
                .enumerate()
                .map(|(i, r)| rule(r, namespace).map_err(|e| format!("rules[{i}]: {e}")))
                .collect::<Result<_, _>>()?,
        ),
    };
    let name = format!("{namespace}/{}", ap.metadata.name);
    Ok(Some(L7Policy { name, deny, targets, rules }))
}

fn target(r: &serde_yaml_ng::Value, namespace: &str) -> Result<Target, String> {
    let field = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let (kind, name) = (field("kind"), field("name"));
    if name.is_empty() {
        return Err("targetRef has no name".into());
    }
    let ns = match field("namespace") {
        n if n.is_empty() || n == namespace => namespace.to_string(),
        n => return Err(format!("targetRef to namespace {n}: a policy may only target its own namespace")),
    };
    match (kind.as_str(), field("group").as_str()) {
        ("Service", "" | "core") => Ok(Target::Service { namespace: ns, name }),
        ("Gateway", "gateway.networking.k8s.io") => Ok(Target::Gateway { namespace: ns, name }),
        _ => Err(format!("targetRef kind {kind:?} is not a Service or a waypoint Gateway")),
    }
}

fn rule(r: &AuthorizationRule, namespace: &str) -> Result<Rule, String> {
    let from = r
        .from
        .iter()
        .map(|f| {
            let s = &f.source;
            if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
                return Err("requestPrincipals need JWT authentication, which the waypoint does not do".to_string());
            }
            if !s.remote_ip_blocks.is_empty() || !s.not_remote_ip_blocks.is_empty() {
                return Err("remoteIpBlocks are not supported".to_string());
            }
            let mut principals = s.principals.clone();
            let mut not_principals = s.not_principals.clone();
            // serviceAccounts: `ns/sa` (or `sa` in the policy's namespace) as principals.
            principals.extend(s.service_accounts.iter().map(|sa| sa_principal(sa, namespace)));
            not_principals.extend(s.not_service_accounts.iter().map(|sa| sa_principal(sa, namespace)));
            Ok(Source {
                principals: Values::new(principals)?,
                not_principals: Values::new(not_principals)?,
                namespaces: Values::new(s.namespaces.clone())?,
                not_namespaces: Values::new(s.not_namespaces.clone())?,
                ip_blocks: cidrs(&s.ip_blocks)?,
                not_ip_blocks: cidrs(&s.not_ip_blocks)?,
            })
        })
        .collect::<Result<_, _>>()?;
    let upper = |v: &[String]| v.iter().map(|m| m.to_ascii_uppercase()).collect::<Vec<_>>();
    let to =
        r.to.iter()
            .map(|t| {
                let o = &t.operation;
                Ok(Operation {
                    hosts: Values::new(o.hosts.clone())?,
                    not_hosts: Values::new(o.not_hosts.clone())?,
                    ports: ports(&o.ports)?,
                    not_ports: ports(&o.not_ports)?,
                    methods: Values::new(upper(&o.methods))?,
                    not_methods: Values::new(upper(&o.not_methods))?,
                    paths: Values::new(o.paths.clone())?,
                    not_paths: Values::new(o.not_paths.clone())?,
                })
            })
            .collect::<Result<_, String>>()?;
    let when = r.when.iter().map(condition).collect::<Result<_, _>>()?;
    Ok(Rule { from, to, when })
}

/// `serviceAccounts` entries: `ns/sa`, or `sa` in the policy's own namespace.
fn sa_principal(sa: &str, namespace: &str) -> String {
    match sa.split_once('/') {
        Some((ns, name)) => format!("*/ns/{ns}/sa/{name}"),
        None => format!("*/ns/{namespace}/sa/{sa}"),
    }
}

fn condition(c: &Condition) -> Result<When, String> {
    let key = if let Some(h) = c.key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
        WhenKey::Header(h.to_ascii_lowercase())
    } else {
        match c.key.as_str() {
            "source.principal" => WhenKey::SourcePrincipal,
            "source.namespace" => WhenKey::SourceNamespace,
            "source.ip" => WhenKey::SourceIp,
            "destination.port" => WhenKey::DestinationPort,
            other => return Err(format!("when key {other:?} is not supported by the waypoint")),
        }
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(format!("when {}: needs values or notValues", c.key));
    }
    Ok(When { key, values: Values::new(c.values.clone())?, not_values: Values::new(c.not_values.clone())? })
}

fn ports(v: &[String]) -> Result<Vec<u16>, String> {
    v.iter().map(|p| p.parse::<u16>().map_err(|_| format!("port {p:?} is not a number"))).collect()
}

fn cidrs(v: &[String]) -> Result<Vec<Cidr>, String> {
    v.iter().map(|c| c.parse::<Cidr>().map_err(|e| format!("ipBlock {c:?}: {}", e.0))).collect()
}

impl L7Policy {
    /// Whether the policy is bound to `service` (namespace, name) or to the waypoint.
    pub fn applies_to(&self, service: (&str, &str), waypoint: (&str, &str)) -> bool {
        self.targets.iter().any(|t| match t {
            Target::Service { namespace, name } => (namespace.as_str(), name.as_str()) == service,
            Target::Gateway { namespace, name } => (namespace.as_str(), name.as_str()) == waypoint,
        })
    }

    fn matches(&self, f: &RequestFacts<'_>) -> bool {
        self.rules.as_ref().is_some_and(|rules| rules.iter().any(|r| r.matches(f, self.deny)))
    }
}

impl Rule {
    fn matches(&self, f: &RequestFacts<'_>, deny: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(f)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(f, deny)))
            && self.when.iter().all(|w| w.matches(f, deny))
    }
}

/// `set` must hold when given; `not` must not.
fn both(set: &Values, not: &Values, v: Option<&str>, m: impl Fn(&Values, &str) -> bool) -> bool {
    (set.is_empty() || v.is_some_and(|v| m(set, v))) && !(v.is_some_and(|v| m(not, v)))
}

impl Source {
    fn matches(&self, f: &RequestFacts<'_>) -> bool {
        let any = |vs: &Values, v: &str| vs.any(v);
        both(&self.principals, &self.not_principals, f.principal, any)
            && both(&self.namespaces, &self.not_namespaces, f.namespace, any)
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|c| c.contains(f.source_ip)))
            && !self.not_ip_blocks.iter().any(|c| c.contains(f.source_ip))
    }
}

impl Operation {
    fn matches(&self, f: &RequestFacts<'_>, deny: bool) -> bool {
        let ports = (self.ports.is_empty() || self.ports.contains(&f.port)) && !self.not_ports.contains(&f.port);
        let http_fields =
            [&self.hosts, &self.not_hosts, &self.methods, &self.not_methods, &self.paths, &self.not_paths];
        if !f.http {
            return ports && (deny || http_fields.iter().all(|v| v.is_empty()));
        }
        let any = |vs: &Values, v: &str| vs.any(v);
        let method = f.method.to_ascii_uppercase();
        both(&self.hosts, &self.not_hosts, Some(&host_name(f.host)), |vs, v| vs.any_ignoring_case(v))
            && both(&self.methods, &self.not_methods, Some(&method), any)
            && both(&self.paths, &self.not_paths, Some(f.path), any)
            && ports
    }
}

/// The host of a `Host` / `:authority` value: no userinfo, no port, no trailing dot.
fn host_name(authority: &str) -> String {
    let host = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')) => h,
        _ => host,
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl When {
    fn matches(&self, f: &RequestFacts<'_>, deny: bool) -> bool {
        let port = f.port.to_string();
        let value = match &self.key {
            WhenKey::Header(h) => {
                if !f.http {
                    return deny;
                }
                // Every value of the header, and all of them joined as one list: a second
                // header line or a non-UTF-8 byte must not hide a value from a DENY.
                let values: Vec<String> = f
                    .headers
                    .get_all(h.as_str())
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                if values.is_empty() {
                    return self.values.is_empty() && !self.not_values.is_empty();
                }
                let joined = values.join(",");
                let hit = |vs: &Values| values.iter().chain([&joined]).any(|v| vs.any(v));
                return (self.values.is_empty() || hit(&self.values)) && !hit(&self.not_values);
            }
            WhenKey::SourcePrincipal => f.principal,
            WhenKey::SourceNamespace => f.namespace,
            WhenKey::DestinationPort => Some(port.as_str()),
            WhenKey::SourceIp => {
                let ip = f.source_ip;
                let inside = |vs: &Values| {
                    vs.0.iter().any(|c| c.parse::<Cidr>().is_ok_and(|c| c.contains(ip)) || c == &ip.to_string())
                };
                return (self.values.is_empty() || inside(&self.values)) && !inside(&self.not_values);
            }
        };
        both(&self.values, &self.not_values, value, |vs, v| vs.any(v))
    }
}

/// Decides one request against the policies bound to `service` or the waypoint:
/// `Err(reason)` denies. `poisoned` says a policy bound there could not be read.
pub fn evaluate<'a>(
    policies: impl Iterator<Item = &'a L7Policy>,
    poisoned: bool,
    service: (&str, &str),
    waypoint: (&str, &str),
    f: &RequestFacts<'_>,
) -> Result<(), String> {
    if poisoned {
        return Err("a policy bound here was rejected; denying everything until it is fixed".into());
    }
    let bound: Vec<&L7Policy> = policies.filter(|p| p.applies_to(service, waypoint)).collect();
    if let Some(p) = bound.iter().find(|p| p.deny && p.matches(f)) {
        return Err(format!("denied by {}", p.name));
    }
    let mut allows = bound.iter().filter(|p| !p.deny).peekable();
    if allows.peek().is_none() {
        return Ok(());
    }
    if allows.any(|p| p.matches(f)) {
        Ok(())
    } else {
        Err("allow policies exist, but none allowed".into())
    }
}
