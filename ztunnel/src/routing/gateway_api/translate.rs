//! Gateway API rules as VirtualService rules, so the engine's matching and actions run them.
//! Each route is read once into rule templates (independent of where it attaches); a
//! template becomes one VirtualService HTTP rule per match and per effective hostname, so
//! the caller can sort them into the Gateway API's precedence order. Semantics the
//! VirtualService lacks are expressed with what it has:
//!
//! - `PathPrefix /foo` matches whole segments (`/foo`, `/foo/`, `/foo/bar`, not `/foobar`):
//!   the regex `/foo(?:/.*)?`; a trailing `/` in the value is ignored, `/` matches all.
//! - `ReplacePrefixMatch` in a URLRewrite: a `uriRegexRewrite` of `^/foo` to the
//!   replacement (or of `^/foo/?` to `/` when the replacement is empty or `/`), which yields
//!   the spec's table (`/foo/bar` → `/xyz/bar`, `/foo` → `/`, ...). In a RequestRedirect the
//!   location is built by [`super::ParentRoutes::decide`] from the matched prefix.
//! - Route hostnames: an `authority` regex per hostname (case-insensitive, any port).
//! - Invalid backends: a destination named [`super::INVALID_BACKEND`] keeping its weight, so
//!   its share of requests gets 500 (gRPC: 503, i.e. `UNAVAILABLE`); when every backend of a
//!   rule is invalid, weighted 0 or absent, the rule answers that status itself.
//! - gRPC methods: the path `/<service>/<method>` (exact, or a regex when one side is absent
//!   or `RegularExpression`).
use std::collections::BTreeMap;
use std::time::Duration;

use super::cluster::{Cluster, Grants, Unresolved};
use super::types::{
    BackendRef, GrpcRouteSpec, HttpHeaderFilter, HttpHeaderMatch, HttpPathModifier, HttpRequestRedirectFilter,
    HttpRouteFilter, HttpRouteMatch, HttpRouteSpec, HttpRouteTimeouts, TcpRouteSpec,
};
use super::{Reason, RouteKind, INVALID_BACKEND};
use crate::routing::spec::{self, Destination, HttpMatch, PortSelector, StringMatch};

/// Where a rule's matches rank in the precedence order (larger first): path kind (exact 3,
/// segment prefix 2, regex 1, catch-all 0) and length, then method, header and query
/// counts. gRPC: a method match ranks as a prefix of its service's length, then by the
/// method's length (the `method` slot), then header count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct MatchRank {
    pub path_kind: u8,
    pub path_len: usize,
    pub method: usize,
    pub headers: usize,
    pub query: usize,
}

/// One match of a rule, ready to become a VirtualService match block.
#[derive(Debug, Clone)]
pub(super) struct MatchTemplate {
    pub block: HttpMatch,
    pub rank: MatchRank,
    /// The `PathPrefix` value (no trailing `/`; empty for `/`), for `ReplacePrefixMatch`.
    pub prefix: Option<String>,
}

/// A redirect's parts; the location depends on the request and the listener port.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RedirectSpec {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<HttpPathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

/// A valid rule of a route.
#[derive(Debug, Clone)]
pub(super) struct Rule {
    pub index: usize,
    pub matches: Vec<MatchTemplate>,
    /// Action, header changes, mirrors, timeouts and the host rewrite (no match blocks).
    pub base: spec::HttpRoute,
    pub rewrite_path: Option<HttpPathModifier>,
    pub redirect: Option<RedirectSpec>,
    /// What a request sent to an invalid backend gets.
    pub invalid_status: u16,
}

/// A route read and checked: its valid rules, the rules refused (index, reason, message)
/// and every backend reference that did not resolve.
#[derive(Debug, Clone, Default)]
pub(super) struct Translated {
    pub rules: Vec<Rule>,
    pub invalid_rules: Vec<(usize, Reason, String)>,
    pub unresolved: Vec<Unresolved>,
    /// TCPRoute: the first rule's destinations.
    pub tcp: Vec<spec::RouteDestination>,
}

/// Why part of a route cannot be used: the whole object (what the API server's validation
/// would have refused) or one rule (a route condition).
enum Fault {
    Object(String),
    Rule(Reason, String),
}

type Faulty<T> = Result<T, Fault>;

fn unsupported<T>(msg: impl Into<String>) -> Faulty<T> {
    Err(Fault::Rule(Reason::UnsupportedValue, msg.into()))
}

struct Ctx<'a> {
    cluster: &'a Cluster,
    /// `None`: cross-namespace backends need no ReferenceGrant (a mesh-only route).
    grants: Option<&'a Grants>,
    kind: RouteKind,
    namespace: &'a str,
    unresolved: Vec<Unresolved>,
}

/// GEP-1294: a route attached only to Services augments what clients can already reach,
/// so its backends may be in any namespace without a ReferenceGrant.
fn grants_for<'a>(grants: &'a Grants, parents: &[super::types::ParentReference]) -> Option<&'a Grants> {
    let mesh_only = !parents.is_empty()
        && parents.iter().all(|p| p.group.as_deref() == Some("") && p.kind.as_deref() == Some("Service"));
    (!mesh_only).then_some(grants)
}

/// Reads an HTTPRoute's rules (an absent rule list is one rule matching everything).
/// `Err`: the object is malformed.
pub(super) fn http_route(
    cluster: &Cluster,
    grants: &Grants,
    namespace: &str,
    s: &HttpRouteSpec,
) -> Result<Translated, String> {
    let grants = grants_for(grants, &s.parent_refs);
    let mut ctx = Ctx { cluster, grants, kind: RouteKind::Http, namespace, unresolved: vec![] };
    let default_rules = vec![Default::default()];
    let rules = s.rules.as_ref().unwrap_or(&default_rules);
    let mut out = Translated::default();
    for (i, r) in rules.iter().enumerate() {
        let matches = if r.matches.is_empty() { vec![HttpRouteMatch::default()] } else { r.matches.clone() };
        let built = matches
            .iter()
            .map(http_match)
            .collect::<Faulty<Vec<_>>>()
            .and_then(|m| rule(&mut ctx, i, m, &r.filters, &r.backend_refs, r.timeouts.as_ref()));
        collect(&mut out, i, built)?;
    }
    out.unresolved = ctx.unresolved;
    Ok(out)
}

/// Reads a GRPCRoute's rules (a rule without matches matches every call; a route without
/// rules routes nothing).
pub(super) fn grpc_route(
    cluster: &Cluster,
    grants: &Grants,
    namespace: &str,
    s: &GrpcRouteSpec,
) -> Result<Translated, String> {
    let grants = grants_for(grants, &s.parent_refs);
    let mut ctx = Ctx { cluster, grants, kind: RouteKind::Grpc, namespace, unresolved: vec![] };
    let mut out = Translated::default();
    for (i, r) in s.rules.iter().enumerate() {
        let built = if r.matches.is_empty() {
            Ok(vec![MatchTemplate { block: HttpMatch::default(), rank: MatchRank::default(), prefix: None }])
        } else {
            r.matches.iter().map(grpc_match).collect::<Faulty<Vec<_>>>()
        };
        let built = built.and_then(|m| rule(&mut ctx, i, m, &r.filters, &r.backend_refs, None));
        collect(&mut out, i, built)?;
    }
    out.unresolved = ctx.unresolved;
    Ok(out)
}

/// Reads a TCPRoute: the first rule's weighted backends (several rules have no defined
/// choice among them for one connection; the first is used).
pub(super) fn tcp_route(
    cluster: &Cluster,
    grants: &Grants,
    namespace: &str,
    s: &TcpRouteSpec,
) -> Result<Translated, String> {
    let grants = grants_for(grants, &s.parent_refs);
    let mut ctx = Ctx { cluster, grants, kind: RouteKind::Tcp, namespace, unresolved: vec![] };
    let mut out = Translated::default();
    for (i, r) in s.rules.iter().enumerate() {
        match destinations(&mut ctx, &r.backend_refs) {
            Ok(d) if i == 0 => out.tcp = d,
            Ok(_) => {}
            Err(Fault::Object(m)) => return Err(format!("rules[{i}]: {m}")),
            Err(Fault::Rule(reason, m)) => out.invalid_rules.push((i, reason, m)),
        }
    }
    if s.rules.is_empty() {
        return Err("a TCPRoute needs at least one rule".into());
    }
    if out.tcp.is_empty() {
        // No backend can take the connection: it is refused.
        out.tcp = vec![invalid_destination(1)];
    }
    out.unresolved = ctx.unresolved;
    Ok(out)
}

fn collect(out: &mut Translated, i: usize, built: Faulty<Rule>) -> Result<(), String> {
    match built {
        Ok(r) => out.rules.push(r),
        Err(Fault::Object(m)) => return Err(format!("rules[{i}]: {m}")),
        Err(Fault::Rule(reason, m)) => out.invalid_rules.push((i, reason, format!("rules[{i}]: {m}"))),
    }
    Ok(())
}

/// An HTTPRoute match as a match block and its rank.
fn http_match(m: &HttpRouteMatch) -> Faulty<MatchTemplate> {
    let mut block = HttpMatch::default();
    let kind = m.path.as_ref().and_then(|p| p.kind.as_deref()).unwrap_or("PathPrefix");
    let value = m.path.as_ref().and_then(|p| p.value.as_deref()).unwrap_or("/");
    let mut prefix = None;
    let (path_kind, path_len) = match kind {
        "Exact" | "PathPrefix" if !value.starts_with('/') || value.contains("//") => {
            return Err(Fault::Object(format!("path {value:?} must start with / and have no empty segment")));
        }
        "Exact" => {
            block.uri = Some(StringMatch { exact: Some(value.into()), ..Default::default() });
            (3, value.len())
        }
        "PathPrefix" => {
            let p = value.trim_end_matches('/');
            prefix = Some(p.to_string());
            if p.is_empty() {
                (0, 0)
            } else {
                block.uri = Some(regex(format!("{}(?:/.*)?", regex::escape(p))));
                (2, p.len())
            }
        }
        "RegularExpression" => {
            block.uri = Some(regex(value.to_string()));
            (1, value.len())
        }
        other => return unsupported(format!("path match type {other} is not supported")),
    };
    block.headers = conditions(&m.headers, true)?;
    block.query_params = conditions(&m.query_params, false)?;
    block.method = m.method.as_ref().map(|v| StringMatch { exact: Some(v.clone()), ..Default::default() });
    let rank = MatchRank {
        path_kind,
        path_len,
        method: usize::from(m.method.is_some()),
        headers: block.headers.len(),
        query: block.query_params.len(),
    };
    Ok(MatchTemplate { block, rank, prefix })
}

/// A GRPCRoute match: the method as the path `/<service>/<method>`, and headers.
fn grpc_match(m: &super::types::GrpcRouteMatch) -> Faulty<MatchTemplate> {
    let mut block = HttpMatch::default();
    let mut rank = MatchRank::default();
    if let Some(mm) = &m.method {
        let service = mm.service.as_deref().filter(|s| !s.is_empty());
        let method = mm.method.as_deref().filter(|s| !s.is_empty());
        if service.is_none() && method.is_none() {
            return Err(Fault::Object("a method match needs a service or a method".into()));
        }
        let any = "[^/]+".to_string();
        block.uri = Some(match mm.kind.as_deref().unwrap_or("Exact") {
            "Exact" => {
                if service.is_some_and(|s| s.contains('/')) || method.is_some_and(|s| s.contains('/')) {
                    return Err(Fault::Object("an exact service or method cannot contain /".into()));
                }
                match (service, method) {
                    (Some(s), Some(m)) => StringMatch { exact: Some(format!("/{s}/{m}")), ..Default::default() },
                    _ => {
                        let s = service.map(regex::escape).unwrap_or_else(|| any.clone());
                        regex(format!("/{s}/{}", method.map(regex::escape).unwrap_or(any)))
                    }
                }
            }
            "RegularExpression" => regex(format!(
                "/(?:{})/(?:{})",
                service.map(str::to_string).unwrap_or_else(|| any.clone()),
                method.map(str::to_string).unwrap_or(any)
            )),
            other => return unsupported(format!("method match type {other} is not supported")),
        });
        rank.path_kind = 2;
        rank.path_len = service.map_or(0, str::len);
        rank.method = method.map_or(0, str::len);
    }
    block.headers = conditions(&m.headers, true)?;
    rank.headers = block.headers.len();
    Ok(MatchTemplate { block, rank, prefix: None })
}

fn regex(r: String) -> StringMatch {
    StringMatch { regex: Some(r), ..Default::default() }
}

/// Header (names case-insensitive) or query (names exact) conditions; of several entries
/// for one name only the first counts, as the spec says.
fn conditions(list: &[HttpHeaderMatch], header: bool) -> Faulty<BTreeMap<String, StringMatch>> {
    let mut out = BTreeMap::new();
    for h in list {
        let name = if header { h.name.to_ascii_lowercase() } else { h.name.clone() };
        let m = match h.kind.as_deref().unwrap_or("Exact") {
            "Exact" => StringMatch { exact: Some(h.value.clone()), ..Default::default() },
            "RegularExpression" => regex(h.value.clone()),
            other => return unsupported(format!("match type {other} of {} is not supported", h.name)),
        };
        out.entry(name).or_insert(m);
    }
    Ok(out)
}

/// A rule's filters and backends as a VirtualService rule (without its match blocks).
fn rule(
    ctx: &mut Ctx,
    index: usize,
    matches: Vec<MatchTemplate>,
    filters: &[HttpRouteFilter],
    backends: &[BackendRef],
    timeouts: Option<&HttpRouteTimeouts>,
) -> Faulty<Rule> {
    let grpc = ctx.kind == RouteKind::Grpc;
    let invalid_status: u16 = if grpc { 503 } else { 500 };
    let mut base = spec::HttpRoute::default();
    let (mut request, mut response, mut redirect, mut url_rewrite) = (None, None, None, None);
    let mut extension = None;
    for f in filters {
        let twice = || Fault::Rule(Reason::IncompatibleFilters, format!("filter {} is given twice", f.kind));
        let missing = || Fault::Object(format!("filter {} has no {} field", f.kind, lower_first(&f.kind)));
        match f.kind.as_str() {
            "RequestHeaderModifier" => {
                if request.is_some() {
                    return Err(twice());
                }
                request = Some(header_ops(f.request_header_modifier.as_ref().ok_or_else(missing)?)?);
            }
            "ResponseHeaderModifier" => {
                if response.is_some() {
                    return Err(twice());
                }
                response = Some(header_ops(f.response_header_modifier.as_ref().ok_or_else(missing)?)?);
            }
            "RequestMirror" => {
                let m = f.request_mirror.as_ref().ok_or_else(missing)?;
                let pct = match (m.percent, m.fraction) {
                    (Some(_), Some(_)) => {
                        return Err(Fault::Object("mirror: set percent or fraction, not both".into()))
                    }
                    (Some(p), None) if (0..=100).contains(&p) => p as f64,
                    (None, Some(fr)) if fraction_ok(fr) => {
                        100.0 * fr.numerator as f64 / fr.denominator.unwrap_or(100) as f64
                    }
                    (None, None) => 100.0,
                    _ => return Err(Fault::Object("mirror: percent or fraction out of range".into())),
                };
                match backend_destination(ctx, &m.backend_ref)? {
                    Some(destination) if destination.host != INVALID_BACKEND => {
                        base.mirrors.push(spec::Mirror { destination, percentage: Some(spec::Percent { value: pct }) })
                    }
                    _ => {} // not resolved: dropped (ResolvedRefs says why)
                }
            }
            "RequestRedirect" if !grpc => {
                if redirect.is_some() {
                    return Err(twice());
                }
                redirect = Some(redirect_spec(f.request_redirect.as_ref().ok_or_else(missing)?)?);
            }
            "URLRewrite" if !grpc => {
                if url_rewrite.is_some() {
                    return Err(twice());
                }
                url_rewrite = Some(f.url_rewrite.clone().ok_or_else(missing)?);
            }
            "ExtensionRef" => {
                let e = f.extension_ref.as_ref().ok_or_else(missing)?;
                extension = Some(format!("{}/{} {}", e.group, e.kind, e.name));
            }
            other => return unsupported(format!("filter {other} is not supported")),
        }
    }
    if redirect.is_some() && url_rewrite.is_some() {
        return Err(Fault::Rule(
            Reason::IncompatibleFilters,
            "RequestRedirect and URLRewrite cannot be combined".into(),
        ));
    }
    let path_modifiers = redirect
        .as_ref()
        .and_then(|r| r.path.as_ref())
        .into_iter()
        .chain(url_rewrite.as_ref().and_then(|u| u.path.as_ref()));
    for pm in path_modifiers {
        match (pm.kind.as_str(), &pm.replace_full_path, &pm.replace_prefix_match) {
            ("ReplaceFullPath", Some(_), None) => {}
            ("ReplacePrefixMatch", None, Some(_)) if matches.iter().all(|m| m.prefix.is_some()) => {}
            ("ReplacePrefixMatch", None, Some(_)) => {
                return unsupported("ReplacePrefixMatch needs every match of the rule to be a PathPrefix match")
            }
            ("ReplaceFullPath" | "ReplacePrefixMatch", _, _) => {
                return Err(Fault::Object(format!("path modifier {} sets the wrong field", pm.kind)))
            }
            (other, _, _) => return unsupported(format!("path modifier {other} is not supported")),
        }
    }
    if request.is_some() || response.is_some() {
        base.headers = Some(spec::Headers { request, response });
    }
    if let Some(u) = &url_rewrite {
        base.rewrite = Some(spec::Rewrite { authority: u.hostname.clone(), ..Default::default() });
    }
    if let Some(t) = timeouts {
        let request = t.request.as_deref().map(gep2257).transpose().map_err(Fault::Object)?;
        let backend = t.backend_request.as_deref().map(gep2257).transpose().map_err(Fault::Object)?;
        if let (Some(r), Some(b)) = (request, backend) {
            if !r.is_zero() && b > r {
                return Err(Fault::Object("timeouts.backendRequest cannot be longer than timeouts.request".into()));
            }
        }
        base.timeout = request.filter(|d| !d.is_zero()).map(|d| format!("{}ms", d.as_millis()));
        if let Some(b) = backend.filter(|d| !d.is_zero()) {
            base.retries = Some(spec::Retries {
                attempts: 2,
                per_try_timeout: Some(format!("{}ms", b.as_millis())),
                retry_on: None,
            });
        }
    }
    let dests = destinations(ctx, backends)?;
    if let Some(r) = &redirect {
        base.redirect = Some(spec::Redirect { redirect_code: Some(r.status.into()), ..Default::default() });
    } else if let Some(e) = extension {
        ctx.unresolved.push((Reason::InvalidKind, format!("filter extensionRef {e} is not supported")));
        base.direct_response = Some(respond(invalid_status, "filter not supported"));
    } else if dests.is_empty() || dests.iter().all(|d| d.destination.host == INVALID_BACKEND) {
        base.direct_response = Some(respond(invalid_status, "no valid backend"));
    } else {
        base.route = dests;
    }
    let rule = Rule { index, matches, base, rewrite_path: url_rewrite.and_then(|u| u.path), redirect, invalid_status };
    // What the engine refuses (a regex that does not compile, a header value it cannot
    // send) makes this rule invalid, not the whole parent's routes.
    let vs = spec::VirtualService {
        http: rule.matches.iter().map(|m| rule.instantiate(m, None)).collect(),
        ..Default::default()
    };
    crate::routing::compile("check", &vs, &BTreeMap::new())
        .map_err(|e| Fault::Rule(Reason::UnsupportedValue, e.reason))?;
    Ok(rule)
}

fn fraction_ok(f: super::types::Fraction) -> bool {
    let den = f.denominator.unwrap_or(100);
    f.numerator >= 0 && den >= 1 && f.numerator <= den
}

fn respond(status: u16, body: &str) -> spec::DirectResponse {
    spec::DirectResponse { status: status.into(), body: Some(spec::DirectBody { string: Some(body.into()) }) }
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_ascii_lowercase().to_string() + c.as_str()).unwrap_or_default()
}

/// A header filter as header operations. Names are lower-cased; a name given twice (in any
/// of set / add / remove) is invalid, as the spec says.
fn header_ops(f: &HttpHeaderFilter) -> Faulty<spec::HeaderOperations> {
    let mut ops = spec::HeaderOperations::default();
    let mut seen = std::collections::BTreeSet::new();
    let mut once = |name: &str| -> Faulty<String> {
        let n = name.to_ascii_lowercase();
        if !seen.insert(n.clone()) {
            return unsupported(format!("header {name} is modified twice in one filter"));
        }
        Ok(n)
    };
    for h in &f.set {
        ops.set.insert(once(&h.name)?, h.value.clone());
    }
    for h in &f.add {
        ops.add.insert(once(&h.name)?, h.value.clone());
    }
    for name in &f.remove {
        ops.remove.push(once(name)?);
    }
    Ok(ops)
}

fn redirect_spec(r: &HttpRequestRedirectFilter) -> Faulty<RedirectSpec> {
    if let Some(s) = &r.scheme {
        if s != "http" && s != "https" {
            return unsupported(format!("redirect scheme {s} is not supported"));
        }
    }
    let status = r.status_code.unwrap_or(302);
    if ![301, 302, 303, 307, 308].contains(&status) {
        return unsupported(format!("redirect statusCode {status} is not supported"));
    }
    let port = match r.port {
        Some(p) => Some(
            u16::try_from(p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| Fault::Object(format!("redirect port {p} is out of range")))?,
        ),
        None => None,
    };
    Ok(RedirectSpec {
        scheme: r.scheme.clone(),
        hostname: r.hostname.clone(),
        path: r.path.clone(),
        port,
        status: status as u16,
    })
}

/// A rule's weighted destinations: backends weighted 0 are left out (but still checked);
/// one that does not resolve becomes [`INVALID_BACKEND`] with its weight.
fn destinations(ctx: &mut Ctx, refs: &[BackendRef]) -> Faulty<Vec<spec::RouteDestination>> {
    let mut out = vec![];
    for b in refs {
        let weight = b.weight.unwrap_or(1);
        if !(0..=1_000_000).contains(&weight) {
            return Err(Fault::Object(format!("backendRef {}: weight {weight} is outside 0-1000000", b.target.name)));
        }
        let mut request = None;
        let mut response = None;
        for f in &b.filters {
            match (f.kind.as_str(), &f.request_header_modifier, &f.response_header_modifier) {
                ("RequestHeaderModifier", Some(h), _) if request.is_none() => request = Some(header_ops(h)?),
                ("ResponseHeaderModifier", _, Some(h)) if response.is_none() => response = Some(header_ops(h)?),
                (other, _, _) => return unsupported(format!("backendRef filter {other} is not supported")),
            }
        }
        let Some(destination) = backend_destination(ctx, &b.target)? else { continue };
        if weight == 0 {
            continue;
        }
        let headers = (request.is_some() || response.is_some()).then_some(spec::Headers { request, response });
        out.push(spec::RouteDestination { destination, weight, headers });
    }
    Ok(out)
}

/// A backend reference resolved (or [`INVALID_BACKEND`], with the reason recorded).
fn backend_destination(ctx: &mut Ctx, b: &super::types::BackendObjectReference) -> Faulty<Option<Destination>> {
    let service = b.group.as_deref().unwrap_or("").is_empty() && b.kind.as_deref().unwrap_or("Service") == "Service";
    let port = match b.port {
        Some(p) => Some(
            u16::try_from(p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| Fault::Object(format!("backendRef {}: port {p} is out of range", b.name)))?,
        ),
        None if service => return Err(Fault::Object(format!("backendRef {}: a Service needs a port", b.name))),
        None => None,
    };
    Ok(Some(match ctx.cluster.resolve(ctx.grants, ctx.kind, ctx.namespace, b) {
        Ok(host) => Destination { host, subset: None, port: port.map(|p| PortSelector { number: p.into() }) },
        Err(u) => {
            ctx.unresolved.push(u);
            invalid_destination(0).destination
        }
    }))
}

pub(super) fn invalid_destination(weight: i64) -> spec::RouteDestination {
    spec::RouteDestination {
        destination: Destination { host: INVALID_BACKEND.into(), ..Default::default() },
        weight,
        headers: None,
    }
}

/// A GEP-2257 duration: one to four `<1-5 digits><h|m|s|ms>` parts (`1h30m`, `500ms`).
pub(super) fn gep2257(s: &str) -> Result<Duration, String> {
    let bad = || format!("duration {s:?} is not a Gateway API duration");
    let (mut rest, mut ms, mut parts) = (s, 0u64, 0);
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else {
            match rest.chars().next() {
                Some('h') => (3_600_000, 1),
                Some('m') => (60_000, 1),
                Some('s') => (1_000, 1),
                _ => return Err(bad()),
            }
        };
        ms += n * unit;
        rest = &rest[len..];
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(Duration::from_millis(ms))
}

impl Rule {
    /// The VirtualService rule for one match of this rule on one effective hostname
    /// (`None`: any host).
    pub(super) fn instantiate(&self, m: &MatchTemplate, host: Option<&str>) -> spec::HttpRoute {
        let mut r = self.base.clone();
        let mut block = m.block.clone();
        block.authority = host.map(authority);
        r.matches = vec![block];
        if let Some(pm) = &self.rewrite_path {
            let rw = r.rewrite.get_or_insert_with(Default::default);
            match (&pm.replace_full_path, &pm.replace_prefix_match, &m.prefix) {
                (Some(full), _, _) => rw.uri = Some(full.clone()),
                (None, Some(with), Some(prefix)) => {
                    let with = with.trim_end_matches('/');
                    let esc = regex::escape(prefix);
                    rw.uri_regex_rewrite = Some(if with.is_empty() {
                        spec::RegexRewrite { pattern: format!("^{esc}/?"), rewrite: "/".into() }
                    } else {
                        spec::RegexRewrite { pattern: format!("^{esc}"), rewrite: with.into() }
                    });
                }
                _ => {}
            }
        }
        r
    }
}

/// An `authority` condition for a route hostname: exact or `*.suffix` (at least one more
/// label), case-insensitive, with any port.
fn authority(host: &str) -> StringMatch {
    let pattern = match host.strip_prefix("*.") {
        Some(suffix) => format!("(?i)[^:/]+\\.{}(?::[0-9]+)?", regex::escape(suffix)),
        None => format!("(?i){}(?::[0-9]+)?", regex::escape(host)),
    };
    regex(pattern)
}

/// How specific an effective hostname is: characters of an exact name, then characters of
/// any name (a wildcard's), larger first; any host ranks last.
pub(super) fn host_rank(host: Option<&str>) -> (usize, usize) {
    match host {
        Some(h) if h.starts_with('*') => (0, h.len()),
        Some(h) => (h.len(), h.len()),
        None => (0, 0),
    }
}
