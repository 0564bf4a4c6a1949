//! What the cluster holds that attaching a route depends on — the Services (with ports),
//! the Gateways of the classes we run (with listeners), namespace labels and
//! ReferenceGrants — and the attachment rules themselves: which listeners (or Service
//! port) a parentRef selects, and why one is refused. Kept apart from translation so the
//! checks that produce `Accepted` / `ResolvedRefs` conditions read as the spec states them.
use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::types::{
    BackendObjectReference, GatewaySpec, Listener, ParentReference, ReferenceGrantSpec, ServiceSpec, GROUP,
};
use super::{Invalid, ParentKey, Reason, RouteKind};

/// The Gateway classes this data plane serves: `istio` (ingress) and `istio-waypoint`.
pub const GATEWAY_CLASSES: [&str; 2] = ["istio", "istio-waypoint"];

/// A parent a parentRef selects, with the route hostnames effective there (`None`: any).
pub(super) type Attachment = (ParentKey, Option<Vec<String>>);

/// Why a parentRef does not attach (`None`: the parent is not ours, no status is written).
pub(super) type Refusal = Option<(Reason, String)>;

/// A Service port: its number and (optional) name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
}

/// A Gateway we may program: its class and listeners.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayInfo {
    pub class: String,
    pub listeners: Vec<Listener>,
}

/// The cluster view route attachment is checked against. Build it from YAML with
/// [`Cluster::from_docs`] or, from live state, with [`Cluster::new`] and the `add_*` methods.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `(namespace, name)` → ports (empty: unknown, any port accepted).
    pub services: BTreeMap<(String, String), Vec<ServicePort>>,
    /// Namespace → labels (a namespace not listed has only `kubernetes.io/metadata.name`).
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// `(namespace, name)` → Gateway, of any class; only [`Cluster::classes`] are ours.
    pub gateways: BTreeMap<(String, String), GatewayInfo>,
    /// The Gateway classes we program (default [`GATEWAY_CLASSES`]).
    pub classes: BTreeSet<String>,
    /// The DNS suffix of Services (`cluster.local`): backends become
    /// `name.namespace.svc.<domain>`.
    pub cluster_domain: String,
    /// Gateways that did not parse (reported by [`super::load`] with the routes' rejects).
    pub rejected: Vec<Invalid>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Cluster {
    /// An empty view serving [`GATEWAY_CLASSES`] in `cluster.local`.
    pub fn new() -> Self {
        Cluster {
            services: BTreeMap::new(),
            namespace_labels: BTreeMap::new(),
            gateways: BTreeMap::new(),
            classes: GATEWAY_CLASSES.iter().map(|c| c.to_string()).collect(),
            cluster_domain: "cluster.local".into(),
            rejected: vec![],
        }
    }

    /// Reads Namespaces (labels), Services (ports) and Gateways (`gateway.networking.k8s.io`
    /// v1 / v1beta1) from YAML documents; other kinds are skipped.
    pub fn from_docs(docs: &[serde_yaml_ng::Value]) -> Self {
        let mut c = Cluster::new();
        for d in docs {
            let (ns, name) = (namespace_of(d), name_of(d));
            match d["kind"].as_str() {
                Some("Namespace") => {
                    let labels = serde_yaml_ng::from_value(d["metadata"]["labels"].clone()).unwrap_or_default();
                    c.namespace_labels.insert(name, labels);
                }
                Some("Service") if d["apiVersion"] == "v1" => {
                    let spec: ServiceSpec = serde_yaml_ng::from_value(d["spec"].clone()).unwrap_or_default();
                    let ports = spec
                        .ports
                        .into_iter()
                        .filter_map(|p| Some(ServicePort { name: p.name, port: u16::try_from(p.port).ok()? }))
                        .collect();
                    c.add_service(&ns, &name, ports);
                }
                Some("Gateway") => match read_spec::<GatewaySpec>(d, "Gateway", &["v1", "v1beta1"]) {
                    Ok(g) => c.add_gateway(&ns, &name, g),
                    Err(e) => c.rejected.push(e),
                },
                _ => {}
            }
        }
        c
    }

    /// Records a Service and its ports.
    pub fn add_service(&mut self, namespace: &str, name: &str, ports: Vec<ServicePort>) {
        self.services.insert((namespace.into(), name.into()), ports);
    }

    /// Records a Gateway.
    pub fn add_gateway(&mut self, namespace: &str, name: &str, spec: GatewaySpec) {
        let info = GatewayInfo { class: spec.gateway_class_name, listeners: spec.listeners };
        self.gateways.insert((namespace.into(), name.into()), info);
    }

    /// The labels of `namespace`, with the implicit `kubernetes.io/metadata.name`.
    fn labels(&self, namespace: &str) -> BTreeMap<String, String> {
        let mut l = self.namespace_labels.get(namespace).cloned().unwrap_or_default();
        l.insert("kubernetes.io/metadata.name".into(), namespace.into());
        l
    }

    /// The Gateways we program, with their listeners.
    pub(super) fn our_gateways(&self) -> impl Iterator<Item = (&(String, String), &GatewayInfo)> {
        self.gateways.iter().filter(|(_, g)| self.classes.contains(&g.class))
    }

    /// Where `pref` (written in a `kind` route of `route_ns` with `hostnames`) attaches:
    /// each parent with the route hostnames effective there (`None`: any host). `Ok(empty)`
    /// never happens; `Err(None)`: not a parent of ours (no status is written for it).
    pub(super) fn attach(
        &self,
        kind: RouteKind,
        route_ns: &str,
        hostnames: &[String],
        pref: &ParentReference,
    ) -> Result<Vec<Attachment>, Refusal> {
        let group = pref.group.as_deref().unwrap_or(GROUP);
        let ns = pref.namespace.clone().unwrap_or_else(|| route_ns.to_string());
        match (group, pref.kind.as_deref().unwrap_or("Gateway")) {
            ("", "Service") => self.attach_service(route_ns, &ns, pref),
            (GROUP, "Gateway") => self.attach_gateway(kind, route_ns, &ns, hostnames, pref),
            _ => Err(None),
        }
    }

    /// GAMMA: a route for a Service (all its ports, or the one `port` / `sectionName`
    /// names). Route hostnames are ignored there (GEP-1294). A route of another namespace
    /// is a consumer route: it applies only to clients of its own namespace.
    fn attach_service(&self, route_ns: &str, ns: &str, pref: &ParentReference) -> Result<Vec<Attachment>, Refusal> {
        let Some(ports) = self.services.get(&(ns.to_string(), pref.name.clone())) else {
            return Err(Some((Reason::NoMatchingParent, format!("Service {ns}/{} does not exist", pref.name))));
        };
        let mut port = match pref.port {
            Some(p) => Some(
                u16::try_from(p)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| Some((Reason::NoMatchingParent, format!("port {p} is not a port number"))))?,
            ),
            None => None,
        };
        if let Some(section) = &pref.section_name {
            let named = ports.iter().find(|p| p.name.as_deref() == Some(section.as_str())).map(|p| p.port);
            match (named, port) {
                (Some(n), Some(p)) if n != p => {
                    return Err(Some((Reason::NoMatchingParent, format!("port {section} is not port {p}"))));
                }
                (Some(n), _) => port = Some(n),
                (None, _) => {
                    return Err(Some((
                        Reason::NoMatchingParent,
                        format!("Service {ns}/{} has no port {section}", pref.name),
                    )))
                }
            }
        }
        if let Some(p) = port {
            if !ports.is_empty() && !ports.iter().any(|sp| sp.port == p) {
                return Err(Some((Reason::NoMatchingParent, format!("Service {ns}/{} has no port {p}", pref.name))));
            }
        }
        let consumer_namespace = (route_ns != ns).then(|| route_ns.to_string());
        let key = ParentKey::Service { namespace: ns.into(), name: pref.name.clone(), port, consumer_namespace };
        Ok(vec![(key, None)])
    }

    /// The listeners of a Gateway a parentRef selects, narrowed in the spec's order: by
    /// `sectionName` / `port` (else `NoMatchingParent`), by allowed kinds and namespaces
    /// (else `NotAllowedByListeners`), by hostname intersection for HTTP and gRPC routes
    /// (else `NoMatchingListenerHostname`).
    fn attach_gateway(
        &self,
        kind: RouteKind,
        route_ns: &str,
        ns: &str,
        hostnames: &[String],
        pref: &ParentReference,
    ) -> Result<Vec<Attachment>, Refusal> {
        let Some(gw) = self.gateways.get(&(ns.to_string(), pref.name.clone())) else { return Err(None) };
        if !self.classes.contains(&gw.class) {
            return Err(None);
        }
        let selected: Vec<&Listener> = gw
            .listeners
            .iter()
            .filter(|l| pref.section_name.as_ref().is_none_or(|s| *s == l.name))
            .filter(|l| pref.port.is_none_or(|p| p == l.port))
            .collect();
        if selected.is_empty() {
            return Err(Some((
                Reason::NoMatchingParent,
                "no listener matches the parentRef's sectionName and port".into(),
            )));
        }
        let allowed: Vec<&Listener> =
            selected.into_iter().filter(|l| kind_allowed(l, kind) && self.namespace_allowed(l, ns, route_ns)).collect();
        if allowed.is_empty() {
            return Err(Some((
                Reason::NotAllowedByListeners,
                format!("no listener allows a {kind} from namespace {route_ns}"),
            )));
        }
        let mut out = vec![];
        for l in allowed {
            let key = ParentKey::Gateway { namespace: ns.into(), name: pref.name.clone(), section: l.name.clone() };
            if kind == RouteKind::Tcp {
                out.push((key, None));
                continue;
            }
            if let Some(hosts) = effective_hostnames(l.hostname.as_deref(), hostnames) {
                out.push((key, hosts));
            }
        }
        if out.is_empty() {
            return Err(Some((
                Reason::NoMatchingListenerHostname,
                "no route hostname intersects a listener hostname".into(),
            )));
        }
        Ok(out)
    }

    /// `allowedRoutes.namespaces`: `Same` (default), `All` or `Selector` on namespace labels.
    fn namespace_allowed(&self, l: &Listener, gw_ns: &str, route_ns: &str) -> bool {
        let from = l.allowed_routes.as_ref().and_then(|a| a.namespaces.as_ref());
        match from.and_then(|f| f.from.as_deref()).unwrap_or("Same") {
            "All" => true,
            "Selector" => from.and_then(|f| f.selector.as_ref()).is_some_and(|s| s.matches(&self.labels(route_ns))),
            "Same" => gw_ns == route_ns,
            _ => false,
        }
    }
}

/// The route kinds a listener protocol carries: HTTP and gRPC routes on `HTTP` / `HTTPS`,
/// TCPRoute on `TCP`, all three on a waypoint's `HBONE` listener; narrowed by
/// `allowedRoutes.kinds` when set.
fn kind_allowed(l: &Listener, kind: RouteKind) -> bool {
    let by_protocol: &[RouteKind] = match l.protocol.as_str() {
        "HTTP" | "HTTPS" => &[RouteKind::Http, RouteKind::Grpc],
        "TCP" => &[RouteKind::Tcp],
        "HBONE" => &[RouteKind::Http, RouteKind::Grpc, RouteKind::Tcp],
        _ => &[],
    };
    if !by_protocol.contains(&kind) {
        return false;
    }
    let kinds = l.allowed_routes.as_ref().map(|a| a.kinds.as_slice()).unwrap_or_default();
    kinds.is_empty() || kinds.iter().any(|k| k.group.as_deref().unwrap_or(GROUP) == GROUP && k.kind == kind.as_str())
}

/// The route hostnames effective on a listener with hostname `listener`: `Some(None)` any
/// host; `Some(Some(list))` these; `None` no intersection (the route does not attach).
fn effective_hostnames(listener: Option<&str>, route: &[String]) -> Option<Option<Vec<String>>> {
    match (listener, route.is_empty()) {
        (None, true) => Some(None),
        (None, false) => Some(Some(dedup(route.iter().map(|h| h.to_ascii_lowercase())))),
        (Some(l), true) => Some(Some(vec![l.to_ascii_lowercase()])),
        (Some(l), false) => {
            let hosts = dedup(route.iter().filter_map(|h| intersect(l, h)));
            (!hosts.is_empty()).then_some(Some(hosts))
        }
    }
}

fn dedup(it: impl Iterator<Item = String>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    it.filter(|h| seen.insert(h.clone())).collect()
}

/// The hostnames both `a` and `b` (each exact or `*.suffix`) match, as one name: the more
/// specific of the two, or `None` when they are disjoint.
pub(super) fn intersect(a: &str, b: &str) -> Option<String> {
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    let covers =
        |wild: &str, other: &str| wild.strip_prefix('*').is_some_and(|s| other.ends_with(s) && other.len() > s.len());
    match (a.starts_with("*."), b.starts_with("*.")) {
        (false, false) => (a == b).then_some(a),
        (true, false) => covers(&a, &b).then_some(b),
        (false, true) => covers(&b, &a).then_some(a),
        (true, true) if a == b || covers(&a, &b) => Some(b),
        (true, true) => covers(&b, &a).then_some(a),
    }
}

/// Whether two sets of effective hostnames (`None`: any) share a host.
pub(super) fn hostnames_overlap(a: &Option<Vec<String>>, b: &Option<Vec<String>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.iter().any(|x| b.iter().any(|y| intersect(x, y).is_some())),
        _ => true,
    }
}

/// The ReferenceGrants in force: a cross-namespace backend reference is allowed only when
/// a grant in the backend's namespace names the route's kind and namespace and the backend.
#[derive(Debug, Clone, Default)]
pub(super) struct Grants(Vec<(String, ReferenceGrantSpec)>);

impl Grants {
    pub(super) fn add(&mut self, namespace: String, spec: ReferenceGrantSpec) {
        self.0.push((namespace, spec));
    }

    /// Whether a `kind` route in `from_ns` may reference Service `name` in `to_ns`.
    pub(super) fn allows(&self, kind: RouteKind, from_ns: &str, to_ns: &str, name: &str) -> bool {
        self.0.iter().filter(|(ns, _)| ns == to_ns).any(|(_, g)| {
            g.from.iter().any(|f| f.group == GROUP && f.kind == kind.as_str() && f.namespace == from_ns)
                && g.to
                    .iter()
                    .any(|t| t.group.is_empty() && t.kind == "Service" && t.name.as_deref().is_none_or(|n| n == name))
        })
    }
}

/// Why a backend reference does not resolve: the `ResolvedRefs` reason and a message.
pub(super) type Unresolved = (Reason, String);

impl Cluster {
    /// The Service FQDN a backend reference names, if it resolves: the kind must be a core
    /// Service, a cross-namespace reference needs a ReferenceGrant (unless `grants` is
    /// `None`), and the Service must exist.
    pub(super) fn resolve(
        &self,
        grants: Option<&Grants>,
        kind: RouteKind,
        route_ns: &str,
        b: &BackendObjectReference,
    ) -> Result<String, Unresolved> {
        let group = b.group.as_deref().unwrap_or("");
        let bkind = b.kind.as_deref().unwrap_or("Service");
        if !group.is_empty() || bkind != "Service" {
            let g = if group.is_empty() { "core".to_string() } else { group.to_string() };
            return Err((Reason::InvalidKind, format!("backendRef {}: kind {g}/{bkind} is not supported", b.name)));
        }
        let ns = b.namespace.as_deref().unwrap_or(route_ns);
        if ns != route_ns && grants.is_some_and(|g| !g.allows(kind, route_ns, ns, &b.name)) {
            return Err((
                Reason::RefNotPermitted,
                format!("backendRef {ns}/{}: no ReferenceGrant allows a {kind} from {route_ns}", b.name),
            ));
        }
        if !self.services.contains_key(&(ns.to_string(), b.name.clone())) {
            return Err((Reason::BackendNotFound, format!("backendRef {ns}/{}: Service not found", b.name)));
        }
        Ok(format!("{}.{ns}.svc.{}", b.name, self.cluster_domain))
    }
}

/// `metadata.namespace` (`default` when absent).
pub(super) fn namespace_of(d: &serde_yaml_ng::Value) -> String {
    d["metadata"]["namespace"].as_str().unwrap_or("default").to_string()
}

/// `metadata.name` (`?` when absent).
pub(super) fn name_of(d: &serde_yaml_ng::Value) -> String {
    d["metadata"]["name"].as_str().unwrap_or("?").to_string()
}

/// The `spec` of a `gateway.networking.k8s.io` object of one of `versions`.
pub(super) fn read_spec<T: for<'de> Deserialize<'de>>(
    d: &serde_yaml_ng::Value,
    kind: &str,
    versions: &[&str],
) -> Result<T, Invalid> {
    let name = format!("{}/{}", namespace_of(d), name_of(d));
    let api = d["apiVersion"].as_str().unwrap_or_default();
    let known = api.strip_prefix(GROUP).and_then(|v| v.strip_prefix('/')).is_some_and(|v| versions.contains(&v));
    if !known {
        return Err(Invalid::ApiVersion { kind: kind.into(), name, api_version: api.into() });
    }
    if d["metadata"]["name"].as_str().is_none_or(str::is_empty) {
        return Err(Invalid::Validation { kind: kind.into(), name, reason: "metadata.name is missing".into() });
    }
    serde_yaml_ng::from_value(d["spec"].clone()).map_err(|e| Invalid::Spec {
        kind: kind.into(),
        name,
        reason: e.to_string(),
    })
}
