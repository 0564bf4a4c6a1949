//! Validation (as Istio's webhook does it) and compilation of a VirtualService into matchers.
//! An invalid object is rejected whole, with its name and the first reason, so the caller
//! keeps serving the previous valid version.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::matching::{MatchBlock, StrMatch};
use super::spec::{self, Destination, HttpRoute, Percent, StringMatch, VirtualService};

/// Why a VirtualService was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VirtualService {name}: {reason}")]
pub struct Invalid {
    pub name: String,
    pub reason: String,
}

/// What a matching rule does.
#[derive(Debug, Clone)]
pub enum Action {
    /// Forward to one of these, chosen by weight, with each destination's header changes.
    Route(Vec<(Destination, u32, Option<spec::Headers>)>),
    Redirect(spec::Redirect),
    Respond {
        status: u16,
        body: String,
    },
}

/// One HTTP rule, ready to run.
#[derive(Debug, Clone)]
pub struct CompiledRoute {
    pub name: Option<String>,
    /// `None`: the rule has no match blocks and catches everything. `Some(empty)`: every
    /// block was dropped (e.g. `sourceLabels`, which a waypoint ignores) and it never matches.
    pub(super) blocks: Option<Vec<MatchBlock>>,
    pub action: Action,
    pub rewrite: Option<spec::Rewrite>,
    pub(super) uri_regex_rewrite: Option<(regex::Regex, String)>,
    /// Off by default.
    pub timeout: Option<Duration>,
    /// Attempts and per-try timeout (Istio's defaults when unset: 2 attempts,
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`).
    pub retries: Retries,
    pub fault: Option<spec::Fault>,
    /// Mirror targets with the percentage of requests copied.
    pub mirrors: Vec<(Destination, f64)>,
    /// The rule's header changes (request and response).
    pub headers: Option<spec::Headers>,
    /// CORS answered by the waypoint.
    pub cors: Option<Cors>,
}

/// A compiled `corsPolicy`.
#[derive(Debug, Clone)]
pub struct Cors {
    pub(super) origins: Vec<StrMatch>,
    pub policy: spec::CorsPolicy,
}

/// A rule's retry policy after defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Retries {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: String,
}

/// Istio's retry conditions when a rule sets none.
pub const DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

/// A compiled VirtualService.
#[derive(Debug, Clone)]
pub struct Router {
    pub name: String,
    pub hosts: Vec<String>,
    /// The Gateways it is bound to (`ns/name` or a name in its own namespace; `mesh` or none:
    /// the mesh, i.e. waypoints).
    pub gateways: Vec<String>,
    pub(super) http: Vec<CompiledRoute>,
    pub(super) tcp: Vec<TcpRule>,
    pub(super) tls: Vec<TlsRule>,
}

/// A TLS passthrough rule: SNI names, ports (`None`: all) and weighted destinations.
pub(super) type TlsRule = (Vec<String>, Option<Vec<u16>>, Vec<(Destination, u32)>);

/// A TCP rule: the ports it matches (`None`: all) and its weighted destinations.
pub(super) type TcpRule = (Option<Vec<u16>>, Vec<(Destination, u32)>);

/// Validates and compiles `vs` (named `name`); `subsets` lists, per host, the subsets its
/// DestinationRule defines (a destination naming another subset is invalid).
pub fn compile(
    name: &str,
    vs: &VirtualService,
    subsets: &BTreeMap<String, BTreeSet<String>>,
) -> Result<Router, Invalid> {
    let bad = |reason: String| Invalid { name: name.to_string(), reason };
    let mut http = Vec::new();
    for (i, r) in vs.http.iter().enumerate() {
        let label = r.name.clone().unwrap_or_else(|| format!("http[{i}]"));
        http.push(compile_http(r, subsets).map_err(|e| bad(format!("{label}: {e}")))?);
    }
    let mut tcp = Vec::new();
    for (i, r) in vs.tcp.iter().enumerate() {
        let dests = weights(&r.route, subsets)
            .map_err(|e| bad(format!("tcp[{i}]: {e}")))?
            .into_iter()
            .map(|(d, w, _)| (d, w))
            .collect();
        let ports = if r.matches.is_empty() {
            None
        } else {
            Some(
                r.matches
                    .iter()
                    .filter(|m| m.source_labels.is_empty())
                    .filter_map(|m| m.port)
                    .map(port)
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad(format!("tcp[{i}]: {e}")))?,
            )
        };
        tcp.push((ports, dests));
    }
    let mut tls = Vec::new();
    for (i, r) in vs.tls.iter().enumerate() {
        let dests: Vec<(Destination, u32)> = weights(&r.route, subsets)
            .map_err(|e| bad(format!("tls[{i}]: {e}")))?
            .into_iter()
            .map(|(d, w, _)| (d, w))
            .collect();
        if r.matches.is_empty() || r.matches.iter().any(|m| m.sni_hosts.is_empty()) {
            return Err(bad(format!("tls[{i}]: every match needs sniHosts")));
        }
        for m in &r.matches {
            let ports = m.port.map(port).transpose().map_err(|e| bad(format!("tls[{i}]: {e}")))?.map(|p| vec![p]);
            tls.push((m.sni_hosts.clone(), ports, dests.clone()));
        }
    }
    Ok(Router { name: name.to_string(), hosts: vs.hosts.clone(), gateways: vs.gateways.clone(), http, tcp, tls })
}

fn compile_http(r: &HttpRoute, subsets: &BTreeMap<String, BTreeSet<String>>) -> Result<CompiledRoute, String> {
    let kinds = [!r.route.is_empty(), r.redirect.is_some(), r.direct_response.is_some()];
    match kinds.iter().filter(|k| **k).count() {
        0 => return Err("a rule needs one of route, redirect or directResponse".into()),
        1 => {}
        _ if kinds[0] && kinds[1] => return Err("a rule cannot have both redirect and route".into()),
        _ => return Err("route, redirect and directResponse are mutually exclusive".into()),
    }
    let action = if let Some(rd) = &r.redirect {
        if let Some(code) = rd.redirect_code {
            if !(300..=399).contains(&code) {
                return Err(format!("redirectCode {code} is not a 3xx code"));
            }
        }
        Action::Redirect(rd.clone())
    } else if let Some(d) = &r.direct_response {
        if !(200..=599).contains(&d.status) {
            return Err(format!("directResponse status {} is not an HTTP status", d.status));
        }
        Action::Respond {
            status: d.status as u16,
            body: d.body.as_ref().and_then(|b| b.string.clone()).unwrap_or_default(),
        }
    } else {
        Action::Route(weights(&r.route, subsets)?)
    };
    let blocks = if r.matches.is_empty() {
        None
    } else {
        // A waypoint has no source workload of its own to match sourceLabels, a source
        // namespace or gateways against: such blocks are dropped, as Istio drops them.
        let kept = r.matches.iter().filter(|m| {
            m.source_labels.is_empty() && m.source_namespace.is_none() && m.gateways.iter().all(|g| g == "mesh")
        });
        Some(kept.map(block).collect::<Result<Vec<_>, _>>()?)
    };
    if let Some(f) = &r.fault {
        if let Some(d) = &f.delay {
            percent(d.percentage, "fault delay")?;
            duration(d.fixed_delay.as_deref().ok_or("fault delay needs fixedDelay")?)?;
        }
        if let Some(a) = &f.abort {
            percent(a.percentage, "fault abort")?;
            match (a.http_status, &a.grpc_status) {
                (Some(s), _) if !(200..=599).contains(&s) => {
                    return Err(format!("fault abort httpStatus {s} is not an HTTP status"))
                }
                (None, None) => return Err("fault abort needs httpStatus or grpcStatus".into()),
                _ => {}
            }
        }
    }
    let mut mirrors = Vec::new();
    if let Some(m) = &r.mirror {
        mirrors.push((m.clone(), percent(r.mirror_percentage, "mirrorPercentage")?.unwrap_or(100.0)));
    }
    for m in &r.mirrors {
        mirrors.push((m.destination.clone(), percent(m.percentage, "mirrors percentage")?.unwrap_or(100.0)));
    }
    let retries = match &r.retries {
        None => Retries { attempts: 2, per_try_timeout: None, retry_on: DEFAULT_RETRY_ON.into() },
        Some(rt) if rt.attempts < 0 => return Err(format!("retries attempts {} is negative", rt.attempts)),
        Some(rt) => Retries {
            attempts: rt.attempts as u32,
            per_try_timeout: rt.per_try_timeout.as_deref().map(duration).transpose()?,
            retry_on: rt.retry_on.clone().unwrap_or_else(|| DEFAULT_RETRY_ON.into()),
        },
    };
    let uri_regex_rewrite = match r.rewrite.as_ref().and_then(|rw| rw.uri_regex_rewrite.as_ref()) {
        Some(rx) => Some((
            regex::Regex::new(&rx.pattern).map_err(|e| format!("uriRegexRewrite: {e}"))?,
            re2_substitution(&rx.rewrite),
        )),
        None => None,
    };
    if r.rewrite.as_ref().is_some_and(|rw| rw.uri.is_some() && rw.uri_regex_rewrite.is_some()) {
        return Err("rewrite cannot set both uri and uriRegexRewrite".into());
    }
    let cors = match &r.cors_policy {
        Some(c) => {
            if let Some(age) = &c.max_age {
                duration(age)?;
            }
            let origins = c
                .allow_origins
                .iter()
                .map(|o| string_match(o, "corsPolicy allowOrigins", false))
                .collect::<Result<_, _>>()?;
            Some(Cors { origins, policy: c.clone() })
        }
        None => None,
    };
    for ops in [&r.headers].into_iter().chain(r.route.iter().map(|d| &d.headers)).flatten() {
        for h in ops.request.iter().chain(&ops.response) {
            for name in h.set.keys().chain(h.add.keys()).chain(&h.remove) {
                http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("header name {name:?} is invalid"))?;
            }
            for v in h.set.values().chain(h.add.values()) {
                http::HeaderValue::from_str(v).map_err(|_| format!("header value {v:?} is invalid"))?;
            }
        }
    }
    Ok(CompiledRoute {
        headers: r.headers.clone(),
        cors,
        name: r.name.clone(),
        blocks,
        action,
        rewrite: r.rewrite.clone(),
        uri_regex_rewrite,
        timeout: r.timeout.as_deref().map(duration).transpose()?,
        retries,
        fault: r.fault.clone(),
        mirrors,
    })
}

/// Destinations with their weights: negative weights are invalid; a lone destination takes
/// everything; several need weights (relative: they need not sum to 100).
fn weights(
    route: &[spec::RouteDestination],
    subsets: &BTreeMap<String, BTreeSet<String>>,
) -> Result<Vec<(Destination, u32, Option<spec::Headers>)>, String> {
    if route.is_empty() {
        return Err("route has no destinations".into());
    }
    for d in route {
        if d.weight < 0 {
            return Err(format!("weight {} of {} is negative", d.weight, d.destination.host));
        }
        if d.destination.host.is_empty() {
            return Err("destination host is empty".into());
        }
        if let Some(s) = &d.destination.subset {
            let known = subsets.iter().any(|(h, set)| same_host(h, &d.destination.host) && set.contains(s));
            if !known {
                return Err(format!("subset {s} of {} is not defined by any DestinationRule", d.destination.host));
            }
        }
        if let Some(p) = &d.destination.port {
            port(p.number)?;
        }
    }
    if route.len() == 1 {
        return Ok(vec![(route[0].destination.clone(), 100, route[0].headers.clone())]);
    }
    let total: i64 = route.iter().map(|d| d.weight).sum();
    if total == 0 {
        return Err("several destinations need weights".into());
    }
    if total > i64::from(u32::MAX) {
        return Err(format!("weights sum to {total}, more than a 32-bit total"));
    }
    Ok(route.iter().map(|d| (d.destination.clone(), d.weight as u32, d.headers.clone())).collect())
}

/// `reviews` and `reviews.default.svc.cluster.local` name the same service.
fn same_host(a: &str, b: &str) -> bool {
    a == b || a.split('.').next() == b.split('.').next()
}

fn block(m: &spec::HttpMatch) -> Result<MatchBlock, String> {
    let pairs =
        |map: &BTreeMap<String, StringMatch>, what: &str, query: bool| -> Result<Vec<(String, StrMatch)>, String> {
            map.iter()
                .map(|(k, v)| {
                    let name = if query { k.clone() } else { k.to_ascii_lowercase() };
                    Ok((name, string_match(v, &format!("{what} {k}"), query)?))
                })
                .collect()
        };
    Ok(MatchBlock {
        uri: m.uri.as_ref().map(|s| string_match(s, "uri", false)).transpose()?,
        scheme: m.scheme.as_ref().map(|s| string_match(s, "scheme", false)).transpose()?,
        method: m.method.as_ref().map(|s| string_match(s, "method", false)).transpose()?,
        authority: m.authority.as_ref().map(|s| string_match(s, "authority", false)).transpose()?,
        headers: pairs(&m.headers, "header", false)?,
        query_params: pairs(&m.query_params, "queryParam", true)?,
        without_headers: pairs(&m.without_headers, "withoutHeaders", false)?,
        ignore_uri_case: m.ignore_uri_case,
        port: m.port.map(port).transpose()?,
    })
}

/// One of exact / prefix / regex (a regex must compile; it matches the whole string). None
/// set means "present". On a query parameter, `exact: ""` means present too (Istio).
fn string_match(s: &StringMatch, what: &str, query: bool) -> Result<StrMatch, String> {
    match (&s.exact, &s.prefix, &s.regex) {
        (None, None, None) => Ok(StrMatch::Present),
        (Some(e), None, None) if e.is_empty() && query => Ok(StrMatch::Present),
        (Some(e), None, None) => Ok(StrMatch::Exact(e.clone())),
        (None, Some(p), None) => Ok(StrMatch::Prefix(p.clone())),
        (None, None, Some(r)) => regex::Regex::new(&format!("^(?:{r})$"))
            .map(StrMatch::Regex)
            .map_err(|e| format!("{what}: regex {r:?} does not compile: {e}")),
        _ => Err(format!("{what}: set only one of exact, prefix and regex")),
    }
}

/// Istio (RE2, Envoy) writes capture groups in a rewrite as `\1`; the regex crate as `${1}`
/// (and a literal `$` as `$$`).
fn re2_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                let mut n = String::new();
                while let Some(d) = chars.next_if(|d| d.is_ascii_digit()) {
                    n.push(d);
                }
                out.push_str(&format!("${{{n}}}"));
            }
            _ => out.push(c),
        }
    }
    out
}

fn port(p: u32) -> Result<u16, String> {
    u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| format!("port {p} is out of range"))
}

fn percent(p: Option<Percent>, what: &str) -> Result<Option<f64>, String> {
    match p {
        Some(Percent { value }) if !(0.0..=100.0).contains(&value) => Err(format!("{what} {value} is outside 0-100")),
        Some(Percent { value }) => Ok(Some(value)),
        None => Ok(None),
    }
}

/// Istio's duration format: a number with `h`, `m`, `s` or `ms` (e.g. `0.5s`, `7s`, `100ms`).
pub fn duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => return Err(format!("duration {s:?} has no unit")),
    };
    let v: f64 = num.parse().map_err(|_| format!("duration {s:?} is not a number"))?;
    let secs = match unit {
        "h" => v * 3600.0,
        "m" => v * 60.0,
        "s" => v,
        "ms" => v / 1000.0,
        _ => return Err(format!("duration {s:?} has an unknown unit")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration {s:?} is out of range"))
}
