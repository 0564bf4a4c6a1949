//! Running a compiled VirtualService against a request: which rule matches, and what it
//! decides. Randomness (weights) comes in as a number, so decisions are reproducible.
use std::borrow::Cow;

use super::compile::{Action, CompiledRoute, Cors, Router};
use super::spec::{Destination, Headers};

/// What the routing engine knows about a request. Values are borrowed from the live
/// request where they can be (a copy of every header per request showed in the waypoint's
/// profile), owned where a caller made them.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    pub method: Cow<'a, str>,
    pub scheme: Cow<'a, str>,
    /// `:authority` / `Host`.
    pub authority: Cow<'a, str>,
    /// Path with its query string.
    pub path: Cow<'a, str>,
    /// Header names in lower case.
    pub headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The port the request was sent to (the service port).
    pub port: u16,
}

impl Request<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| &**v)
    }

    fn path_only(&self) -> &str {
        self.path.split_once('?').map(|(p, _)| p).unwrap_or(&self.path)
    }

    fn query_param(&self, name: &str) -> Option<&str> {
        let q = self.path.split_once('?')?.1;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
    }
}

/// A compiled string condition.
#[derive(Debug, Clone)]
pub(super) enum StrMatch {
    Exact(String),
    /// A raw string prefix (not path-segment aware).
    Prefix(String),
    /// Anchored: the whole value must match.
    Regex(regex::Regex),
    Present,
}

impl StrMatch {
    pub(super) fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(v),
            StrMatch::Present => true,
        }
    }

    fn matches_ignoring_case(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v.eq_ignore_ascii_case(e),
            StrMatch::Prefix(p) => {
                v.len() >= p.len() && v.is_char_boundary(p.len()) && v[..p.len()].eq_ignore_ascii_case(p)
            }
            other => other.matches(v),
        }
    }
}

/// One match block: every condition it sets must hold.
#[derive(Debug, Clone)]
pub(super) struct MatchBlock {
    pub uri: Option<StrMatch>,
    pub scheme: Option<StrMatch>,
    pub method: Option<StrMatch>,
    pub authority: Option<StrMatch>,
    pub headers: Vec<(String, StrMatch)>,
    pub query_params: Vec<(String, StrMatch)>,
    pub without_headers: Vec<(String, StrMatch)>,
    pub ignore_uri_case: bool,
    pub port: Option<u16>,
}

impl MatchBlock {
    fn matches(&self, req: &Request) -> bool {
        let opt = |m: &Option<StrMatch>, v: &str| m.as_ref().is_none_or(|m| m.matches(v));
        let uri_ok = self.uri.as_ref().is_none_or(|m| {
            if self.ignore_uri_case {
                m.matches_ignoring_case(req.path_only())
            } else {
                m.matches(req.path_only())
            }
        });
        uri_ok
            && opt(&self.scheme, &req.scheme)
            && opt(&self.method, &req.method)
            && opt(&self.authority, &req.authority)
            && self.port.is_none_or(|p| p == req.port)
            && self.headers.iter().all(|(k, m)| req.header(k).is_some_and(|v| m.matches(v)))
            && self.query_params.iter().all(|(k, m)| req.query_param(k).is_some_and(|v| m.matches(v)))
            && !self.without_headers.iter().any(|(k, m)| req.header(k).is_some_and(|v| m.matches(v)))
    }
}

/// One weighted destination of a decision.
pub type WeightedTarget = (Destination, u32);

/// What to do with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Forward to `destination`, with `path` and `authority` after rewrites, and the
    /// chosen destination's own header changes.
    Forward { rule: usize, destination: Destination, path: String, authority: String, headers: Option<Box<Headers>> },
    /// Answer with a redirect to `location`.
    Redirect { rule: usize, code: u16, location: String },
    /// Answer directly.
    Respond { rule: usize, status: u16, body: String },
}

impl Decision {
    /// The index of the rule that decided.
    pub fn rule(&self) -> usize {
        match self {
            Decision::Forward { rule, .. } | Decision::Redirect { rule, .. } | Decision::Respond { rule, .. } => *rule,
        }
    }
}

impl Router {
    /// The first rule whose match blocks (any of them) match `req`, with the block.
    pub fn find(&self, req: &Request) -> Option<(usize, &CompiledRoute, Option<usize>)> {
        self.http.iter().enumerate().find_map(|(i, r)| match &r.blocks {
            None => Some((i, r, None)),
            Some(blocks) => blocks.iter().position(|b| b.matches(req)).map(|bi| (i, r, Some(bi))),
        })
    }

    /// Decides for `req`; `roll` (uniform, any u32) picks among weighted destinations.
    /// `None`: no rule matches (the request goes to the service unchanged).
    pub fn decide(&self, req: &Request, roll: u32) -> Option<Decision> {
        let (i, r, block) = self.find(req)?;
        Some(match &r.action {
            Action::Route(dests) => {
                let total: u64 = dests.iter().map(|(_, w, _)| *w as u64).sum();
                let mut at = roll as u64 % total.max(1);
                let (destination, _, headers) = dests
                    .iter()
                    .find(|(_, w, _)| {
                        let hit = at < *w as u64;
                        at = at.saturating_sub(*w as u64);
                        hit
                    })
                    .unwrap_or(&dests[0])
                    .clone();
                let matched_prefix = block.and_then(|b| match r.blocks.as_ref()?.get(b)?.uri.as_ref()? {
                    StrMatch::Prefix(p) => Some(p.clone()),
                    _ => None,
                });
                Decision::Forward {
                    rule: i,
                    destination,
                    headers: headers.map(Box::new),
                    path: rewrite_path(r, req, matched_prefix.as_deref()),
                    authority: r
                        .rewrite
                        .as_ref()
                        .and_then(|rw| rw.authority.clone())
                        .unwrap_or_else(|| req.authority.to_string()),
                }
            }
            Action::Redirect(rd) => {
                let scheme = rd.scheme.clone().unwrap_or_else(|| req.scheme.to_string());
                let mut authority = rd.authority.clone().unwrap_or_else(|| req.authority.to_string());
                if let Some(p) = rd.port {
                    let host = authority.rsplit_once(':').map(|(h, _)| h.to_string()).unwrap_or(authority.clone());
                    authority = format!("{host}:{p}");
                }
                let path = rd.uri.clone().unwrap_or_else(|| req.path.to_string());
                Decision::Redirect {
                    rule: i,
                    code: rd.redirect_code.unwrap_or(301) as u16,
                    location: format!("{scheme}://{authority}{path}"),
                }
            }
            Action::Respond { status, body } => Decision::Respond { rule: i, status: *status, body: body.clone() },
        })
    }

    /// The TCP destinations for a connection to `port` (first matching rule).
    pub fn tcp_targets(&self, port: u16) -> Option<&[WeightedTarget]> {
        self.tcp.iter().find(|(ports, _)| ports.as_ref().is_none_or(|ps| ps.contains(&port))).map(|(_, d)| d.as_slice())
    }
}

impl Router {
    /// The destinations of the first TLS rule matching `sni` on `port`.
    pub fn tls_targets(&self, port: u16, sni: &str) -> Option<&[WeightedTarget]> {
        self.tls
            .iter()
            .find(|(hosts, ports, _)| {
                ports.as_ref().is_none_or(|ps| ps.contains(&port)) && hosts.iter().any(|h| host_matches(h, sni))
            })
            .map(|(_, _, d)| d.as_slice())
    }

    /// Whether it applies inside the mesh (waypoints): no `gateways`, or `mesh` among them.
    pub fn for_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == "mesh")
    }

    /// Whether it is bound to Gateway `namespace/name` (`gateways: [name]` names one in the
    /// VirtualService's own namespace).
    pub fn bound_to(&self, namespace: &str, name: &str) -> bool {
        let own_ns = self.name.split_once('/').map(|(ns, _)| ns).unwrap_or("default");
        self.gateways.iter().any(|g| match g.split_once('/') {
            Some((ns, n)) => ns == namespace && n == name,
            None => own_ns == namespace && g == name,
        })
    }

    /// Whether an ingress request for `host` (no port) is for it: `*`, an exact name, or
    /// `*.suffix`, case-insensitively.
    pub fn serves_external(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| host_matches(h, host))
    }

    /// The rule a decision names.
    pub fn rule(&self, i: usize) -> Option<&CompiledRoute> {
        self.http.get(i)
    }

    /// Whether any HTTP rule exists (a VirtualService with only `tcp` rules leaves HTTP alone).
    pub fn has_http(&self) -> bool {
        !self.http.is_empty()
    }

    /// Whether the VirtualService's `hosts` name the service `hostname` (`name.namespace.svc.<domain>`):
    /// a short name is resolved in the VirtualService's own namespace (`namespace` below), `*.suffix`
    /// and `*` are wildcards.
    pub fn serves(&self, hostname: &str) -> bool {
        let own_ns = self.name.split_once('/').map(|(ns, _)| ns).unwrap_or("default");
        self.hosts.iter().any(|h| {
            if h == "*" || h == hostname {
                return true;
            }
            if let Some(suffix) = h.strip_prefix('*') {
                return hostname.ends_with(suffix);
            }
            let mut parts = h.split('.');
            let (name, ns) = (parts.next().unwrap_or(""), parts.next().unwrap_or(own_ns));
            let svc = hostname.strip_suffix(".").unwrap_or(hostname);
            let mut sp = svc.split('.');
            let (sname, sns) = (sp.next().unwrap_or(""), sp.next().unwrap_or(""));
            // `reviews` or `reviews.default` name the cluster service, never an external host.
            (h.matches('.').count() <= 1 || h.ends_with(".svc") || h.contains(".svc.")) && name == sname && ns == sns
        })
    }
}

impl Cors {
    /// Whether `origin` is one the policy allows.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.origins.iter().any(|m| m.matches(origin))
    }
}

/// The path to forward: `rewrite.uri` replaces the matched prefix (or the whole path when
/// the rule matched otherwise); `uriRegexRewrite` substitutes all matches.
fn rewrite_path(r: &CompiledRoute, req: &Request, matched_prefix: Option<&str>) -> String {
    if let Some((re, with)) = &r.uri_regex_rewrite {
        let (path, query) = req.path.split_once('?').map(|(p, q)| (p, Some(q))).unwrap_or((&req.path, None));
        let out = re.replace_all(path, with.as_str()).into_owned();
        return query.map(|q| format!("{out}?{q}")).unwrap_or(out);
    }
    match (r.rewrite.as_ref().and_then(|rw| rw.uri.as_deref()), matched_prefix) {
        (Some(new), Some(prefix)) if req.path.starts_with(prefix) => format!("{new}{}", &req.path[prefix.len()..]),
        (Some(new), _) => {
            let query = req.path.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
            format!("{new}{query}")
        }
        (None, _) => req.path.to_string(),
    }
}

/// `pattern` (`*`, `*.example.com` or a name) against `host`, case-insensitively.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let (p, h) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    let h = h.strip_suffix('.').unwrap_or(&h);
    if p == "*" || p == h {
        return true;
    }
    p.strip_prefix('*').is_some_and(|suffix| suffix.starts_with('.') && h.ends_with(suffix) && h.len() > suffix.len())
}
