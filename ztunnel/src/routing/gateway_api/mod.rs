//! Gateway API routes (`gateway.networking.k8s.io`) — what Istio recommends for waypoints
//! and ingress — run by our VirtualService engine. Pure: YAML documents and a cluster view
//! in, compiled routers and route conditions out.
//!
//! - [`load`]: HTTPRoute (v1, v1beta1), GRPCRoute (v1, v1alpha2), TCPRoute (v1alpha2, v1)
//!   and ReferenceGrant (v1, v1beta1, v1alpha2) → per parent ([`ParentKey`]: a Service for a
//!   waypoint (GAMMA), or one Gateway listener) a [`ParentRoutes`] holding one compiled
//!   [`Router`] with HTTPRoute and GRPCRoute rules in the Gateway API's precedence order
//!   and the oldest TCPRoute; [`RouteStatus`] conditions per route and parentRef; and
//!   malformed objects ([`Invalid`]).
//! - [`Cluster`]: the Services, Gateways (classes `istio` and `istio-waypoint`) and
//!   namespace labels attachment is checked against.
//! - [`ParentRoutes::decide`]: the engine's decision with the Gateway API's answers where
//!   they differ from a VirtualService's: 404 when no rule matches, 500 (gRPC 503) for a
//!   backend that did not resolve, and redirect locations built as the spec says.
//!
//! Precedence: rules become one VirtualService rule per match and per effective hostname,
//! sorted by hostname (longest exact, then longest wildcard, then any), then path (exact,
//! then segment prefix by length, regex, then `/`), method, header count, query count;
//! ties keep route order (oldest `creationTimestamp`, objects without one first, then
//! `namespace/name`), rule order, match order. GRPCRoute: service length, method length,
//! header count. The engine's first match then is the Gateway API's most precise one.
//! `translate.rs` lists how semantics the VirtualService lacks are expressed.
//!
//! Using it: a waypoint asks [`GatewayRoutes::for_service`] (service, port, client
//! namespace), an ingress [`GatewayRoutes::for_gateway`] (Gateway, port, Host); `None`
//! means no route attaches there. Otherwise [`ParentRoutes::decide`] answers every request
//! (never "pass through"), and [`ParentRoutes::router`] gives the rule's header changes,
//! mirrors and timeouts as for a VirtualService.
//!
//! Choices where the spec leaves one: RegularExpression paths rank below segment prefixes
//! and above `/` (as Istio does); an HTTPRoute and a GRPCRoute sharing a hostname on one
//! parent keep the older (the other gets `Accepted: False`, reason `Conflicted`); a rule
//! with an unsupported filter is dropped (`PartiallyInvalid`); routes attached only to
//! Services need no ReferenceGrant for backends in other namespaces (GEP-1294); route
//! hostnames are ignored on Service parents (GEP-1294); a waypoint Gateway's `HBONE`
//! listener takes HTTP, gRPC and TCP routes.
//!
//! Not implemented: TLSRoute, UDPRoute, the experimental CORS, ExternalAuth and retry
//! settings, and backend kinds other than core Services (`InvalidKind`).
mod cluster;
#[cfg(test)]
mod tests;
mod translate;
pub mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use cluster::{hostnames_overlap, name_of, namespace_of, read_spec, Grants};
pub use cluster::{Cluster, GatewayInfo, ServicePort, GATEWAY_CLASSES};
use translate::{host_rank, RedirectSpec, Translated};
use types::{GrpcRouteSpec, HttpRouteSpec, Listener, ParentReference, ReferenceGrantSpec, TcpRouteSpec, GROUP};

use super::spec::{self, VirtualService};
use super::{compile, Decision, Request, Router, WeightedTarget};

/// The destination host standing for a backend reference that did not resolve: a request
/// routed there is answered 500 (gRPC 503) by [`ParentRoutes::decide`]; a TCP connection
/// there finds no such service and is refused.
pub const INVALID_BACKEND: &str = "invalid-backend.gateway-api.invalid";

/// The rule index of a decision no rule made (the 404 for an unmatched request).
pub const NO_MATCH: usize = usize::MAX;

/// The route kinds we run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    Http,
    Grpc,
    Tcp,
}

impl RouteKind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
            RouteKind::Tcp => "TCPRoute",
        }
    }
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A route by kind, namespace and name (status and decisions name it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteRef {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for RouteRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// What routes attach to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ParentKey {
    /// A Service, i.e. the waypoint serving it (GAMMA): all ports (`port: None`) or one.
    /// `consumer_namespace`: routes written in another namespace than the Service's, which
    /// apply only to clients in that namespace (consumer routes); `None`: the Service
    /// owner's routes, for every client. A key with a port also holds the routes for all
    /// ports.
    Service { namespace: String, name: String, port: Option<u16>, consumer_namespace: Option<String> },
    /// One listener (`section`) of a Gateway: an ingress Gateway or a waypoint's.
    Gateway { namespace: String, name: String, section: String },
}

impl fmt::Display for ParentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParentKey::Service { namespace, name, port, consumer_namespace } => {
                write!(f, "Service {namespace}/{name}")?;
                if let Some(p) = port {
                    write!(f, ":{p}")?;
                }
                if let Some(c) = consumer_namespace {
                    write!(f, " for {c}")?;
                }
                Ok(())
            }
            ParentKey::Gateway { namespace, name, section } => write!(f, "Gateway {namespace}/{name}/{section}"),
        }
    }
}

/// The route condition types we set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionType {
    Accepted,
    ResolvedRefs,
    /// Some rules were dropped as invalid; the others run.
    PartiallyInvalid,
}

/// Condition reasons (the Gateway API's, plus `Conflicted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Accepted,
    ResolvedRefs,
    NotAllowedByListeners,
    NoMatchingListenerHostname,
    NoMatchingParent,
    UnsupportedValue,
    IncompatibleFilters,
    /// An HTTPRoute and a GRPCRoute share a hostname on one parent; the older one is used.
    Conflicted,
    BackendNotFound,
    InvalidKind,
    RefNotPermitted,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One condition of a route on one parent.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub kind: ConditionType,
    pub status: bool,
    pub reason: Reason,
    pub message: String,
}

/// The conditions of a route for one of its parentRefs (with defaults filled in). Written
/// for parents of ours only: a Gateway of another class, or unknown, gets none.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteStatus {
    pub route: RouteRef,
    pub parent: ParentReference,
    pub conditions: Vec<Condition>,
}

impl RouteStatus {
    /// The condition of one type.
    pub fn condition(&self, kind: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }

    /// The parent as operators name it in listings: `Service default/reviews:9080`,
    /// `Gateway istio-ingress/gw/http` (kind, namespace/name, then section or port).
    pub fn parent_text(&self) -> String {
        let p = &self.parent;
        let mut s = format!(
            "{} {}/{}",
            p.kind.as_deref().unwrap_or("Gateway"),
            p.namespace.as_deref().unwrap_or(&self.route.namespace),
            p.name
        );
        if let Some(section) = &p.section_name {
            s.push('/');
            s.push_str(section);
        }
        if let Some(port) = p.port {
            s.push_str(&format!(":{port}"));
        }
        s
    }

    /// Whether every condition is as a healthy route has it (`Accepted` and `ResolvedRefs`
    /// true, no rule dropped).
    pub fn healthy(&self) -> bool {
        self.conditions.iter().all(|c| c.status != (c.kind == ConditionType::PartiallyInvalid))
    }
}

/// `Accepted=True (Accepted)`, `ResolvedRefs=False (BackendNotFound: <message>)`: one
/// condition as status listings show it.
impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = if self.status { "True" } else { "False" };
        write!(f, "{:?}={status} ({}", self.kind, self.reason)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        f.write_str(")")
    }
}

/// An object that cannot be used at all (the API server's validation would refuse it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{kind} {name}: apiVersion {api_version:?} is not supported")]
    ApiVersion { kind: String, name: String, api_version: String },
    #[error("{kind} {name}: spec does not parse: {reason}")]
    Spec { kind: String, name: String, reason: String },
    #[error("{kind} {name}: {reason}")]
    Validation { kind: String, name: String, reason: String },
    #[error("routes of {parent} do not compile: {reason}")]
    Parent { parent: String, reason: String },
}

impl Invalid {
    /// `namespace/name` of the object (or the parent).
    pub fn name(&self) -> &str {
        match self {
            Invalid::ApiVersion { name, .. } | Invalid::Spec { name, .. } | Invalid::Validation { name, .. } => name,
            Invalid::Parent { parent, .. } => parent,
        }
    }
}

/// Per compiled HTTP rule: where it came from and what the engine cannot say itself.
#[derive(Debug, Clone)]
struct RuleInfo {
    route: usize,
    rule: usize,
    redirect: Option<RedirectSpec>,
    prefix: Option<String>,
    invalid_status: u16,
}

/// The routes of one parent, compiled.
#[derive(Debug, Clone)]
pub struct ParentRoutes {
    /// HTTPRoute and GRPCRoute rules in precedence order; the oldest TCPRoute's backends.
    pub router: Router,
    /// For a Gateway parent: the listener.
    pub listener: Option<Listener>,
    /// The routes attached, oldest first.
    pub routes: Vec<RouteRef>,
    rules: Vec<RuleInfo>,
    port: Option<u16>,
}

impl ParentRoutes {
    /// Decides for `req` (`roll`, any u32, picks among weighted backends): the engine's
    /// decision, except that no matching rule is a 404 (rule [`NO_MATCH`]), an unresolved
    /// backend's share is a 500 (gRPC: 503), and a redirect's location follows the spec
    /// (302 by default; port from the filter, else the scheme's well-known port when the
    /// filter sets a scheme, else the listener's; 80 for http and 443 for https left out;
    /// the query string kept).
    pub fn decide(&self, req: &Request, roll: u32) -> Decision {
        let Some(d) = self.router.decide(req, roll) else {
            return Decision::Respond { rule: NO_MATCH, status: 404, body: "route not found".into() };
        };
        let Some(info) = self.rules.get(d.rule()) else { return d };
        match (d, &info.redirect) {
            (Decision::Forward { rule, destination, .. }, _) if destination.host == INVALID_BACKEND => {
                Decision::Respond { rule, status: info.invalid_status, body: "backend not resolved".into() }
            }
            (Decision::Redirect { rule, .. }, Some(rd)) => {
                let location = location(rd, info.prefix.as_deref(), req, self.port);
                Decision::Redirect { rule, code: rd.status, location }
            }
            (other, _) => other,
        }
    }

    /// The TCPRoute's weighted backends (an unresolved one is [`INVALID_BACKEND`]).
    pub fn tcp_targets(&self, port: u16) -> Option<&[WeightedTarget]> {
        self.router.tcp_targets(port)
    }

    /// The route and rule index (within that route) a compiled rule came from.
    pub fn origin(&self, rule: usize) -> Option<(&RouteRef, usize)> {
        let info = self.rules.get(rule)?;
        Some((&self.routes[info.route], info.rule))
    }
}

/// Everything [`load`] read.
#[derive(Debug, Default)]
pub struct GatewayRoutes {
    /// Every listener of our Gateways (none attached: all 404) and every Service with routes.
    pub parents: BTreeMap<ParentKey, ParentRoutes>,
    /// Conditions per route and parentRef, in route precedence order.
    pub statuses: Vec<RouteStatus>,
    pub rejected: Vec<Invalid>,
}

impl GatewayRoutes {
    /// The routes for a request to Service `namespace/name` on `port` from a client in
    /// `client_namespace`: its consumer routes when that namespace wrote some, else the
    /// owner's; the port's own routes include the all-port ones. `None`: no route attaches,
    /// the request goes to the Service as it is.
    pub fn for_service(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
        client_namespace: Option<&str>,
    ) -> Option<&ParentRoutes> {
        if self.parents.is_empty() {
            return None;
        }
        let key = |port: Option<u16>, consumer: Option<&str>| ParentKey::Service {
            namespace: namespace.into(),
            name: name.into(),
            port,
            consumer_namespace: consumer.map(str::to_string),
        };
        let mut tries = vec![];
        if let Some(c) = client_namespace.filter(|c| *c != namespace) {
            tries.extend([key(Some(port), Some(c)), key(None, Some(c))]);
        }
        tries.extend([key(Some(port), None), key(None, None)]);
        tries.iter().find_map(|k| self.parents.get(k))
    }

    /// The listener of Gateway `namespace/name` a request on `port` for `host` (a port in
    /// it is ignored) reaches: the one whose hostname matches most precisely (exact, then
    /// the longest wildcard, then none). `None`: no listener takes it (404).
    pub fn for_gateway(&self, namespace: &str, name: &str, port: u16, host: &str) -> Option<&ParentRoutes> {
        let host = strip_port(host).to_ascii_lowercase();
        let mut best: Option<((u8, usize), &ParentRoutes)> = None;
        for (k, p) in &self.parents {
            let ParentKey::Gateway { namespace: n, name: g, .. } = k else { continue };
            let Some(l) = p.listener.as_ref().filter(|l| n == namespace && g == name && l.port == u32::from(port))
            else {
                continue;
            };
            let score = match l.hostname.as_deref().map(str::to_ascii_lowercase) {
                None => (0, 0),
                Some(h) if h == host => (2, h.len()),
                Some(h) if cluster::intersect(&h, &host).is_some() && h.starts_with("*.") => (1, h.len()),
                Some(_) => continue,
            };
            if best.as_ref().is_none_or(|(s, _)| score > *s) {
                best = Some((score, p));
            }
        }
        best.map(|(_, p)| p)
    }

    /// The statuses of one route.
    pub fn status_of(&self, kind: RouteKind, namespace: &str, name: &str) -> impl Iterator<Item = &RouteStatus> {
        let r = RouteRef { kind, namespace: namespace.into(), name: name.into() };
        self.statuses.iter().filter(move |s| s.route == r)
    }
}

/// Per parent: the routes attached (index in precedence order) with their effective
/// hostnames (`None`: any).
type Attached = Vec<(usize, Option<Vec<String>>)>;

/// How one parentRef of a route (by index) attached: the parents it selected, or why not.
type Attachment<'a> = (usize, &'a ParentReference, Result<Vec<ParentKey>, (Reason, String)>);

/// A route read from YAML.
struct Loaded {
    r: RouteRef,
    created: String,
    parent_refs: Vec<ParentReference>,
    hostnames: Vec<String>,
    t: Translated,
}

/// Reads every HTTPRoute, GRPCRoute, TCPRoute and ReferenceGrant in `docs` (other kinds are
/// skipped; Gateways, Services and Namespaces come from `cluster`), attaches the routes to
/// their parents and compiles each parent's rules.
pub fn load(docs: &[serde_yaml_ng::Value], cluster: &Cluster) -> GatewayRoutes {
    let mut out = GatewayRoutes { rejected: cluster.rejected.clone(), ..Default::default() };
    let mut grants = Grants::default();
    for d in docs.iter().filter(|d| d["kind"] == "ReferenceGrant") {
        match read_spec::<ReferenceGrantSpec>(d, "ReferenceGrant", &["v1", "v1beta1", "v1alpha2"]) {
            Ok(g) => grants.add(namespace_of(d), g),
            Err(e) => out.rejected.push(e),
        }
    }
    let mut routes = vec![];
    for d in docs {
        let kind = match d["kind"].as_str() {
            Some("HTTPRoute") => RouteKind::Http,
            Some("GRPCRoute") => RouteKind::Grpc,
            Some("TCPRoute") => RouteKind::Tcp,
            _ => continue,
        };
        let (ns, name) = (namespace_of(d), name_of(d));
        let invalid =
            |reason: String| Invalid::Validation { kind: kind.to_string(), name: format!("{ns}/{name}"), reason };
        let read = match kind {
            RouteKind::Http => read_spec::<HttpRouteSpec>(d, kind.as_str(), &["v1", "v1beta1"]).and_then(|s| {
                let t = translate::http_route(cluster, &grants, &ns, &s).map_err(invalid)?;
                Ok((s.parent_refs, s.hostnames, t))
            }),
            RouteKind::Grpc => read_spec::<GrpcRouteSpec>(d, kind.as_str(), &["v1", "v1alpha2"]).and_then(|s| {
                let t = translate::grpc_route(cluster, &grants, &ns, &s).map_err(invalid)?;
                Ok((s.parent_refs, s.hostnames, t))
            }),
            RouteKind::Tcp => read_spec::<TcpRouteSpec>(d, kind.as_str(), &["v1alpha2", "v1"]).and_then(|s| {
                let t = translate::tcp_route(cluster, &grants, &ns, &s).map_err(invalid)?;
                Ok((s.parent_refs, vec![], t))
            }),
        };
        match read {
            Ok((parent_refs, hostnames, t)) => routes.push(Loaded {
                r: RouteRef { kind, namespace: ns, name },
                created: d["metadata"]["creationTimestamp"].as_str().unwrap_or_default().to_string(),
                parent_refs,
                hostnames,
                t,
            }),
            Err(e) => out.rejected.push(e),
        }
    }
    routes.sort_by(|a, b| (&a.created, &a.r.namespace, &a.r.name).cmp(&(&b.created, &b.r.namespace, &b.r.name)));

    let (mut attached, results) = attach(&routes, cluster);
    add_all_port_routes(&mut attached);
    let conflicted = drop_conflicts(&routes, &mut attached);
    for (i, pref, result) in results {
        out.statuses.push(status(&routes[i], i, pref, result, &conflicted));
    }
    for (key, list) in attached {
        let listener = match &key {
            ParentKey::Gateway { namespace, name, section } => cluster
                .gateways
                .get(&(namespace.clone(), name.clone()))
                .and_then(|g| g.listeners.iter().find(|l| l.name == *section))
                .cloned(),
            ParentKey::Service { .. } => None,
        };
        match build(&key, listener, &routes, &list, cluster) {
            Ok(p) => {
                out.parents.insert(key, p);
            }
            Err(e) => out.rejected.push(e),
        }
    }
    out
}

/// How each parentRef of each route attaches: the parents with their routes (every listener
/// of ours gets one, so a host it owns never falls to another), and per route and
/// parentRef the parents selected or the refusal.
fn attach<'a>(routes: &'a [Loaded], cluster: &Cluster) -> (BTreeMap<ParentKey, Attached>, Vec<Attachment<'a>>) {
    let mut attached: BTreeMap<ParentKey, Attached> = BTreeMap::new();
    for ((ns, name), gw) in cluster.our_gateways() {
        for l in &gw.listeners {
            let key = ParentKey::Gateway { namespace: ns.clone(), name: name.clone(), section: l.name.clone() };
            attached.entry(key).or_default();
        }
    }
    let mut results = vec![];
    for (i, r) in routes.iter().enumerate() {
        let usable = !all_rules_invalid(r);
        for pref in &r.parent_refs {
            match cluster.attach(r.r.kind, &r.r.namespace, &r.hostnames, pref) {
                Err(None) => {}
                Err(Some(refused)) => results.push((i, pref, Err(refused))),
                Ok(keys) => {
                    for (k, hosts) in keys.iter().filter(|_| usable) {
                        let list = attached.entry(k.clone()).or_default();
                        if !list.iter().any(|(j, _)| *j == i) {
                            list.push((i, hosts.clone()));
                        }
                    }
                    results.push((i, pref, Ok(keys.into_iter().map(|(k, _)| k).collect())));
                }
            }
        }
    }
    (attached, results)
}

/// A Service port's routes include the Service's all-port routes (same consumer namespace),
/// kept in route precedence order.
fn add_all_port_routes(attached: &mut BTreeMap<ParentKey, Attached>) {
    let all_ports: BTreeMap<ParentKey, Attached> = attached
        .iter()
        .filter(|(k, _)| matches!(k, ParentKey::Service { port: None, .. }))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, list) in attached.iter_mut() {
        if let ParentKey::Service { namespace, name, port: Some(_), consumer_namespace } = k {
            let base = ParentKey::Service {
                namespace: namespace.clone(),
                name: name.clone(),
                port: None,
                consumer_namespace: consumer_namespace.clone(),
            };
            for e in all_ports.get(&base).into_iter().flatten() {
                if !list.iter().any(|(j, _)| *j == e.0) {
                    list.push(e.clone());
                }
            }
            list.sort_by_key(|(i, _)| *i);
        }
    }
}

/// An HTTPRoute and a GRPCRoute sharing a hostname on a parent: only the older is kept
/// there. Returns the (route, parent) pairs dropped.
fn drop_conflicts(routes: &[Loaded], attached: &mut BTreeMap<ParentKey, Attached>) -> BTreeSet<(usize, ParentKey)> {
    let mut conflicted = BTreeSet::new();
    for (k, list) in attached.iter_mut() {
        let mut kept: Attached = vec![];
        for (i, hosts) in list.drain(..) {
            let kind = routes[i].r.kind;
            let clash = kind != RouteKind::Tcp
                && kept.iter().any(|(j, h)| {
                    let other = routes[*j].r.kind;
                    other != RouteKind::Tcp && other != kind && hostnames_overlap(h, &hosts)
                });
            if clash {
                conflicted.insert((i, k.clone()));
            } else {
                kept.push((i, hosts));
            }
        }
        *list = kept;
    }
    conflicted
}

/// Whether every rule of an HTTP or gRPC route was refused (a route without rules attaches
/// and routes nothing).
fn all_rules_invalid(r: &Loaded) -> bool {
    r.r.kind != RouteKind::Tcp && r.t.rules.is_empty() && !r.t.invalid_rules.is_empty()
}

/// The conditions of route `r` (index `i`) for `pref`.
fn status(
    r: &Loaded,
    i: usize,
    pref: &ParentReference,
    result: Result<Vec<ParentKey>, (Reason, String)>,
    conflicted: &BTreeSet<(usize, ParentKey)>,
) -> RouteStatus {
    let cond = |kind, status, reason, message: String| Condition { kind, status, reason, message };
    let all_rules_invalid = all_rules_invalid(r);
    let accepted = match result {
        Err((reason, msg)) => cond(ConditionType::Accepted, false, reason, msg),
        Ok(_) if all_rules_invalid => {
            let (reason, msg) =
                r.t.invalid_rules
                    .first()
                    .map(|(_, r, m)| (*r, m.clone()))
                    .unwrap_or((Reason::UnsupportedValue, "no rules".into()));
            cond(ConditionType::Accepted, false, reason, msg)
        }
        Ok(keys) if keys.iter().all(|k| conflicted.contains(&(i, k.clone()))) => cond(
            ConditionType::Accepted,
            false,
            Reason::Conflicted,
            "an older route of the other kind (HTTPRoute / GRPCRoute) has the same hostname here".into(),
        ),
        Ok(_) => cond(ConditionType::Accepted, true, Reason::Accepted, String::new()),
    };
    let resolved = match r.t.unresolved.first() {
        Some((reason, msg)) => cond(ConditionType::ResolvedRefs, false, *reason, msg.clone()),
        None => cond(ConditionType::ResolvedRefs, true, Reason::ResolvedRefs, String::new()),
    };
    let mut conditions = vec![accepted, resolved];
    if let (Some((_, reason, msg)), false) = (r.t.invalid_rules.first(), all_rules_invalid) {
        conditions.push(cond(ConditionType::PartiallyInvalid, true, *reason, msg.clone()));
    }
    let mut parent = pref.clone();
    parent.group.get_or_insert_with(|| GROUP.into());
    parent.kind.get_or_insert_with(|| "Gateway".into());
    parent.namespace.get_or_insert_with(|| r.r.namespace.clone());
    RouteStatus { route: r.r.clone(), parent, conditions }
}

/// One parent's VirtualService, in precedence order, compiled.
fn build(
    key: &ParentKey,
    listener: Option<Listener>,
    routes: &[Loaded],
    attached: &[(usize, Option<Vec<String>>)],
    cluster: &Cluster,
) -> Result<ParentRoutes, Invalid> {
    let mut entries = vec![];
    let mut refs = vec![];
    let mut tcp = None;
    let mut hosts = BTreeSet::new();
    for (i, effective) in attached {
        let r = &routes[*i];
        let route = refs.len();
        refs.push(r.r.clone());
        if r.r.kind == RouteKind::Tcp {
            // The oldest TCPRoute takes the connections; newer ones are accepted but idle.
            tcp.get_or_insert_with(|| r.t.tcp.clone());
            continue;
        }
        let names: Vec<Option<&str>> = match (key, effective) {
            (ParentKey::Gateway { .. }, Some(names)) => names.iter().map(|h| Some(h.as_str())).collect(),
            _ => vec![None],
        };
        hosts.extend(names.iter().map(|h| h.unwrap_or("*").to_string()));
        for rule in &r.t.rules {
            for m in &rule.matches {
                for h in &names {
                    let info = RuleInfo {
                        route,
                        rule: rule.index,
                        redirect: rule.redirect.clone(),
                        prefix: m.prefix.clone(),
                        invalid_status: rule.invalid_status,
                    };
                    entries.push((host_rank(*h), m.rank, entries.len(), rule.instantiate(m, *h), info));
                }
            }
        }
    }
    entries.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
    let hosts = match key {
        ParentKey::Service { namespace, name, .. } => {
            vec![format!("{name}.{namespace}.svc.{}", cluster.cluster_domain)]
        }
        ParentKey::Gateway { .. } if hosts.is_empty() => {
            vec![listener.as_ref().and_then(|l| l.hostname.clone()).unwrap_or_else(|| "*".into())]
        }
        ParentKey::Gateway { .. } => hosts.into_iter().collect(),
    };
    let vs = VirtualService {
        hosts,
        http: entries.iter().map(|e| e.3.clone()).collect(),
        tcp: tcp.map(|route| vec![spec::TcpRoute { route, ..Default::default() }]).unwrap_or_default(),
        ..Default::default()
    };
    // Named `namespace/...` as the engine expects of a VirtualService's name.
    let namespace = match key {
        ParentKey::Service { namespace, .. } | ParentKey::Gateway { namespace, .. } => namespace,
    };
    let router = compile(&format!("{namespace}/{key}"), &vs, &BTreeMap::new())
        .map_err(|e| Invalid::Parent { parent: key.to_string(), reason: e.reason })?;
    let port = match (key, &listener) {
        (ParentKey::Service { port, .. }, _) => *port,
        (ParentKey::Gateway { .. }, Some(l)) => u16::try_from(l.port).ok(),
        _ => None,
    };
    Ok(ParentRoutes { router, listener, routes: refs, rules: entries.into_iter().map(|e| e.4).collect(), port })
}

/// A redirect's `Location` for `req`.
fn location(rd: &RedirectSpec, prefix: Option<&str>, req: &Request, listener_port: Option<u16>) -> String {
    let scheme =
        rd.scheme.clone().unwrap_or_else(|| if req.scheme.is_empty() { "http".into() } else { req.scheme.to_string() });
    let host = rd.hostname.clone().unwrap_or_else(|| strip_port(&req.authority).to_string());
    let port = rd.port.or(match rd.scheme.as_deref() {
        Some("http") => Some(80),
        Some("https") => Some(443),
        _ => listener_port.or((req.port != 0).then_some(req.port)),
    });
    let (path, query) = match req.path.split_once('?') {
        Some((p, q)) => (p, format!("?{q}")),
        None => (&*req.path, String::new()),
    };
    let path = match rd.path.as_ref().map(|p| (&p.replace_full_path, &p.replace_prefix_match)) {
        Some((Some(full), _)) => full.clone(),
        Some((None, Some(with))) => replace_prefix(path, prefix.unwrap_or(""), with),
        _ => path.to_string(),
    };
    let port = match port {
        Some(p) if !((scheme == "http" && p == 80) || (scheme == "https" && p == 443)) => format!(":{p}"),
        _ => String::new(),
    };
    format!("{scheme}://{host}{port}{path}{query}")
}

/// `ReplacePrefixMatch`: the matched segment prefix of `path` replaced, per the spec's table
/// (`/foo/bar` with `/foo` → `/xyz` is `/xyz/bar`; an empty result is `/`).
fn replace_prefix(path: &str, prefix: &str, with: &str) -> String {
    let rest = path.get(prefix.len()..).unwrap_or_default();
    let out = format!("{}{rest}", with.trim_end_matches('/'));
    if out.is_empty() {
        "/".into()
    } else {
        out
    }
}

/// `host` without a `:port` suffix (IPv6 literals in brackets kept whole).
fn strip_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')) => h,
        _ => authority,
    }
}
