//! The Gateway API objects of an L7 proxy's routes directory (HTTPRoute, GRPCRoute,
//! TCPRoute, Gateway, ReferenceGrant) resolved against the mesh's Services, and the choice,
//! per request, between them and the VirtualServices. It exists apart from [`super::routes`]
//! because this view has two inputs that change independently — the YAML documents and the
//! Services of the state store (local config or xDS), which routes attach to and name as
//! backends — and because the precedence between the two route APIs belongs in one place.
//!
//! Precedence, in a waypoint (GAMMA): the routes attached to the Service (parentRef kind
//! `Service`; a client namespace's own consumer routes first), then the routes attached to
//! the waypoint's own Gateway (class `istio-waypoint`, "the entire waypoint" in Istio's
//! words), then the service's VirtualService. This is the order Istio ends up with: its
//! waypoint takes the first route set whose hosts name the service
//! (`getVirtualServiceForWaypoint`), and Gateway API routes of the proxy's namespace are
//! listed before VirtualServices (`SelectVirtualServices`). Istio calls mixing the two APIs
//! undefined; here it is defined, and a VirtualService keeps applying to services no route
//! attaches to. At an ingress: the VirtualServices bound to the Istio Gateways that took the
//! connection, then the routes of the Kubernetes Gateways (class `istio`) whose listeners
//! took it, by listener (port and host).
//!
//! Each object is taken or rejected on its own: a rejected object that had a valid earlier
//! version keeps that version in force, as VirtualServices do.
use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use serde_yaml_ng::Value;

use super::routes::RouteTable;
use crate::routing::gateway_api::types::GROUP;
use crate::routing::gateway_api::{self, Cluster, GatewayRoutes, ParentRoutes, ServicePort, NO_MATCH};
use crate::routing::{Decision, Invalid, Request, Router, WeightedTarget};
use crate::state::{Service, Snapshot};

/// The Services of the state store: `(namespace, name)` → service ports. What Gateway API
/// routes attach to (GAMMA) and name as backends, beside Services written in the YAML.
pub type MeshServices = BTreeMap<(String, String), Vec<u16>>;

/// The Gateway API kinds read from the routes directory.
const KINDS: [&str; 5] = ["Gateway", "HTTPRoute", "GRPCRoute", "TCPRoute", "ReferenceGrant"];
/// Gateway API route kinds that are reported as not served rather than silently dropped.
const NOT_SERVED: [&str; 2] = ["TLSRoute", "UDPRoute"];
/// The class of a waypoint's own Gateway.
const WAYPOINT_CLASS: &str = "istio-waypoint";

/// The Services of a state snapshot.
pub fn mesh_services(snap: &Snapshot) -> MeshServices {
    snap.config
        .services
        .iter()
        .map(|s| ((s.namespace.clone(), s.name.clone()), s.ports.keys().copied().collect()))
        .collect()
}

/// The Gateway API part of a route table.
#[derive(Debug, Default)]
pub struct GatewayApi {
    /// Compiled routes per parent, route conditions, and what was refused.
    pub routes: GatewayRoutes,
    /// The Services, Gateways and namespace labels the routes were attached against.
    pub cluster: Cluster,
    /// The state store's Services they were resolved against.
    pub services: Arc<MeshServices>,
    /// The documents in force — each object's latest valid version — by kind and
    /// `namespace/name`: the previous versions a later rejection falls back to.
    docs: BTreeMap<(String, String), Value>,
}

/// `metadata.namespace/metadata.name` (`default` namespace when absent; just the name for
/// a Namespace), as the translation layer names objects.
fn object_name(d: &Value) -> String {
    let name = d["metadata"]["name"].as_str().unwrap_or("?");
    if d["kind"] == "Namespace" {
        return name.to_string();
    }
    format!("{}/{name}", d["metadata"]["namespace"].as_str().unwrap_or("default"))
}

/// Reads the Gateway API objects of `docs` (with the core Services and Namespaces written
/// there), resolves them against those Services and the state store's `services`, and
/// keeps `previous` versions of objects that are now rejected. Returns the view and what
/// was rejected (named `<Kind> <namespace>/<name>`, or `routes of <parent>`).
pub fn load(docs: &[Value], previous: &GatewayApi, services: Arc<MeshServices>) -> (GatewayApi, Vec<Invalid>) {
    let mut rejected = vec![];
    let mut current: BTreeMap<(String, String), Value> = BTreeMap::new();
    for d in docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        let api = d["apiVersion"].as_str().unwrap_or_default();
        let gateway_api = api.split_once('/').is_some_and(|(g, _)| g == GROUP);
        let core = api == "v1" && matches!(kind, "Service" | "Namespace");
        let name = format!("{kind} {}", object_name(d));
        if gateway_api && NOT_SERVED.contains(&kind) {
            rejected.push(Invalid { name, reason: format!("{kind} is not supported") });
            continue;
        }
        if !(core || gateway_api && KINDS.contains(&kind)) {
            continue;
        }
        let key = (kind.to_string(), object_name(d));
        if current.contains_key(&key) {
            rejected.push(Invalid { name, reason: "defined twice; the first definition is used".into() });
            continue;
        }
        current.insert(key, d.clone());
    }
    let (mut cluster, mut routes) = resolve(&current, &services);
    // Objects refused whole: their previous valid version (if any) stays in force.
    let first_rejects = std::mem::take(&mut routes.rejected);
    let mut fell_back = false;
    for e in &first_rejects {
        let Some(key) = object_key(e) else { continue };
        current.remove(&key);
        if let Some(old) = previous.docs.get(&key) {
            current.insert(key, old.clone());
            fell_back = true;
        }
    }
    if fell_back {
        (cluster, routes) = resolve(&current, &services);
        routes.rejected.clear();
    }
    rejected.extend(first_rejects.iter().map(named));
    // A parent whose routes no longer compile keeps its previous routes.
    for e in &first_rejects {
        let gateway_api::Invalid::Parent { parent, .. } = e else { continue };
        if let Some((k, p)) = previous.routes.parents.iter().find(|(k, _)| k.to_string() == *parent) {
            routes.parents.insert(k.clone(), p.clone());
        }
    }
    (GatewayApi { routes, cluster, services, docs: current }, rejected)
}

/// The cluster view of `docs` plus the mesh's Services, and the routes attached in it.
fn resolve(docs: &BTreeMap<(String, String), Value>, services: &MeshServices) -> (Cluster, GatewayRoutes) {
    let docs: Vec<Value> = docs.values().cloned().collect();
    let mut cluster = Cluster::from_docs(&docs);
    for ((ns, name), ports) in services {
        // A Service written in the YAML says more (port names): it is kept.
        cluster
            .services
            .entry((ns.clone(), name.clone()))
            .or_insert_with(|| ports.iter().map(|p| ServicePort { name: None, port: *p }).collect());
    }
    let routes = gateway_api::load(&docs, &cluster);
    (cluster, routes)
}

/// The kind and name of an object refused whole (`None`: a parent's routes).
fn object_key(e: &gateway_api::Invalid) -> Option<(String, String)> {
    match e {
        gateway_api::Invalid::ApiVersion { kind, name, .. }
        | gateway_api::Invalid::Spec { kind, name, .. }
        | gateway_api::Invalid::Validation { kind, name, .. } => Some((kind.clone(), name.clone())),
        gateway_api::Invalid::Parent { .. } => None,
    }
}

/// A translation-layer rejection as the route table lists rejections.
fn named(e: &gateway_api::Invalid) -> Invalid {
    match e {
        gateway_api::Invalid::ApiVersion { kind, name, api_version } => {
            Invalid { name: format!("{kind} {name}"), reason: format!("apiVersion {api_version:?} is not supported") }
        }
        gateway_api::Invalid::Spec { kind, name, reason } => {
            Invalid { name: format!("{kind} {name}"), reason: format!("spec does not parse: {reason}") }
        }
        gateway_api::Invalid::Validation { kind, name, reason } => {
            Invalid { name: format!("{kind} {name}"), reason: reason.clone() }
        }
        gateway_api::Invalid::Parent { parent, reason } => {
            Invalid { name: format!("routes of {parent}"), reason: reason.clone() }
        }
    }
}

impl GatewayApi {
    /// The routes for a mesh request to `service` on `port` from a client in `client_ns`:
    /// those attached to the Service, else those attached to the waypoint's own Gateway
    /// `waypoint` (`(namespace, name)`, class `istio-waypoint`, its `HBONE` listener). A
    /// parent without routes is skipped, so declaring the waypoint's Gateway alone changes
    /// nothing.
    pub fn for_mesh(
        &self,
        service: &Service,
        port: u16,
        client_ns: Option<&str>,
        waypoint: (&str, &str),
    ) -> Option<&ParentRoutes> {
        let attached = |p: &&ParentRoutes| !p.routes.is_empty();
        if let Some(p) = self.routes.for_service(&service.namespace, &service.name, port, client_ns).filter(attached) {
            return Some(p);
        }
        if self.cluster.gateways.is_empty() {
            return None;
        }
        let gw = self.cluster.gateways.get(&(waypoint.0.to_string(), waypoint.1.to_string()))?;
        if gw.class != WAYPOINT_CLASS {
            return None;
        }
        gw.listeners.iter().filter(|l| l.protocol == "HBONE").find_map(|l| {
            let port = u16::try_from(l.port).ok()?;
            self.routes.for_gateway(waypoint.0, waypoint.1, port, &service.hostname).filter(attached)
        })
    }

    /// Whether a ReferenceGrant in `to_ns` lets a Gateway of `from_ns` use Secret `name`
    /// (a listener's certificate in another namespace).
    pub fn grants_secret(&self, from_ns: &str, to_ns: &str, name: &str) -> bool {
        self.docs.iter().filter(|((kind, n), _)| kind == "ReferenceGrant" && n.starts_with(&format!("{to_ns}/"))).any(
            |(_, d)| {
                let spec = &d["spec"];
                let from =
                    spec["from"].as_sequence().into_iter().flatten().any(|f| {
                        f["group"] == GROUP && f["kind"] == "Gateway" && f["namespace"].as_str() == Some(from_ns)
                    });
                let to = spec["to"].as_sequence().into_iter().flatten().any(|t| {
                    t["group"].as_str().unwrap_or("").is_empty()
                        && t["kind"] == "Secret"
                        && t["name"].as_str().is_none_or(|n| n == name)
                });
                from && to
            },
        )
    }

    /// The admin dump's view: Gateways served, parents with their routes, and each route's
    /// conditions per parent.
    pub fn status_json(&self) -> serde_json::Value {
        let gateways: Vec<_> = self
            .cluster
            .gateways
            .iter()
            .filter(|(_, g)| self.cluster.classes.contains(&g.class))
            .map(|((ns, name), g)| {
                json!({
                    "name": format!("{ns}/{name}"),
                    "class": g.class,
                    "listeners": g.listeners.iter().map(|l| json!({
                        "name": l.name, "port": l.port, "protocol": l.protocol, "hostname": l.hostname,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let parents: Vec<_> = self
            .routes
            .parents
            .iter()
            .map(|(k, p)| json!({"parent": k.to_string(), "routes": p.routes.iter().map(|r| r.to_string()).collect::<Vec<_>>()}))
            .collect();
        let statuses: Vec<_> = self
            .routes
            .statuses
            .iter()
            .map(|s| {
                json!({
                    "route": s.route.to_string(),
                    "parent": s.parent_text(),
                    "conditions": s.conditions.iter().map(|c| json!({
                        "type": format!("{:?}", c.kind),
                        "status": if c.status { "True" } else { "False" },
                        "reason": c.reason.to_string(),
                        "message": c.message,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({"gateways": gateways, "parents": parents, "routeStatus": statuses})
    }
}

/// The routes that decide a request: a Gateway API parent's, or a VirtualService.
#[derive(Debug, Clone, Copy)]
pub enum Chosen<'a> {
    GatewayApi(&'a ParentRoutes),
    VirtualService(&'a Router),
}

impl<'a> Chosen<'a> {
    /// The compiled rules (header changes, mirrors, timeouts of the deciding rule).
    pub fn router(self) -> &'a Router {
        match self {
            Chosen::GatewayApi(p) => &p.router,
            Chosen::VirtualService(r) => r,
        }
    }

    /// The decision for `req`. Gateway API routes always answer (404 when no rule matches,
    /// rule [`NO_MATCH`]; 500 for a backend that did not resolve); `None` only from a
    /// VirtualService none of whose rules match (the request goes to the service as
    /// addressed).
    pub fn decide(self, req: &Request, roll: u32) -> Option<Decision> {
        match self {
            Chosen::GatewayApi(p) => Some(p.decide(req, roll)),
            Chosen::VirtualService(r) => r.decide(req, roll),
        }
    }

    /// The weighted TCP destinations for a connection to `port`.
    pub fn tcp_targets(self, port: u16) -> Option<&'a [WeightedTarget]> {
        match self {
            Chosen::GatewayApi(p) => p.tcp_targets(port),
            Chosen::VirtualService(r) => r.tcp_targets(port),
        }
    }

    /// Whether a tunnel to `port` is relayed as raw TCP: TCP rules and no HTTP rule.
    pub fn is_tcp(self, port: u16) -> bool {
        !self.router().has_http() && self.tcp_targets(port).is_some()
    }

    /// The route name for the access log: the rule's own name, else `<route>[<rule>]`
    /// (empty for a Gateway API request no rule matched).
    pub fn route_name(self, rule: usize) -> String {
        if let Some(name) = self.router().rule(rule).and_then(|c| c.name.clone()) {
            return name;
        }
        match self {
            Chosen::GatewayApi(_) if rule == NO_MATCH => String::new(),
            Chosen::GatewayApi(p) => p.origin(rule).map(|(r, i)| format!("{r}[{i}]")).unwrap_or_default(),
            Chosen::VirtualService(r) => format!("{}[{rule}]", r.name),
        }
    }
}

impl RouteTable {
    /// The routes for a mesh request (or tunnel) to `service` on `port` from a client in
    /// `client_ns`, through the waypoint whose Gateway is `waypoint`: Gateway API routes
    /// first (see the module's precedence), else the service's VirtualService.
    pub fn mesh_route(
        &self,
        service: &Service,
        port: u16,
        client_ns: Option<&str>,
        waypoint: (&str, &str),
    ) -> Option<Chosen<'_>> {
        match self.gateway_api.for_mesh(service, port, client_ns, waypoint) {
            Some(p) => Some(Chosen::GatewayApi(p)),
            None => self.router_for(service).map(Chosen::VirtualService),
        }
    }

    /// The routes for an ingress request for `host` (no port) on `port`: a VirtualService
    /// bound to one of the Istio Gateways `istio`, else the routes of the listener of one of
    /// the Kubernetes Gateways `gateway_api` that takes the host. `None`: 404.
    pub fn ingress_route(
        &self,
        istio: &[(String, String)],
        gateway_api: &[(String, String)],
        port: u16,
        host: &str,
    ) -> Option<Chosen<'_>> {
        if let Some(r) = self.router_for_gateway(istio, host) {
            return Some(Chosen::VirtualService(r));
        }
        gateway_api
            .iter()
            .find_map(|(ns, name)| self.gateway_api.routes.for_gateway(ns, name, port, host))
            .map(Chosen::GatewayApi)
    }
}

#[cfg(test)]
#[path = "gateway_routes_tests.rs"]
mod tests;
