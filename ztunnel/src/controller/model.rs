//! The internal model of the mesh, built from the objects read from files with Istio ambient's semantics:
//! workloads (one per pod with an IP), services (one per Kubernetes Service), L4 authorization policies, known
//! waypoints, and the routing objects carried for the waypoint. Building it is a pure function of the objects;
//! every object ends up in [`Model::status`] as applied, applied with a warning, ignored, or rejected with the
//! reason, and a rejected object leaves the rest in force.
//!
//! Ambient enrolment (tunnel protocol HBONE) follows what istio-cni decides: the pod's namespace is labelled
//! `istio.io/dataplane-mode=ambient`, or the pod itself is; `istio.io/dataplane-mode=none` on the pod opts it out;
//! host-network pods are never captured. Other pods are still workloads, with tunnel protocol NONE, as istiod
//! sends them.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::policy::Authorization;
use crate::state::Locality;

use super::authz::{self, Converted, PeerAuthn};
use super::gateway_routes::{self, RouteConditions, Verdict};
use super::objects::{Object, ObjectMeta, ObjectRef, RawObject, StringMap};
use super::pods::{self, PodInfo};
use super::reuse::{self, Built, Context, Inputs, Reuse};
use super::selectors::{selects, PolicyIndex, SelectorIndex};
use super::services::{load_balancing, service, ServiceBuild};
use super::source::{Loaded, Snapshot};
use super::status::{Origin, Outcome, StatusEntry};
use super::waypoint::{self, Waypoint, WaypointAddress, Waypoints, GATEWAY_NAME_LABEL};

/// The namespace and pod label that enrols pods in ambient.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Set by istio-cni on pods it captured; honoured as an explicit opt-in.
const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Pods that speak HBONE natively.
const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";
const INGRESS_USE_WAYPOINT_LABEL: &str = "istio.io/ingress-use-waypoint";

/// Cluster-wide settings istiod takes from its mesh config and flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Policies here without a selector apply mesh-wide; PeerAuthentications here are mesh defaults.
    pub root_namespace: String,
    /// The SPIFFE trust domain (sent in workloads only when it is not `cluster.local`, as istiod does).
    pub trust_domain: String,
    /// First part of workload uids.
    pub cluster_id: String,
    /// Service hostnames are `<name>.<namespace>.svc.<domain_suffix>`.
    pub domain_suffix: String,
    /// The network of every workload and address (empty: the default network).
    pub network: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            root_namespace: "istio-system".into(),
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            domain_suffix: "cluster.local".into(),
            network: String::new(),
        }
    }
}

/// How a node proxy reaches a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelProtocol {
    /// Plain TCP (not in the mesh).
    None,
    /// HTTP/2 CONNECT over mTLS to port 15008.
    Hbone,
}

/// Application protocol of a service port, from `appProtocol` or the port name prefix (Istio's rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    Unknown,
    Http11,
    Http2,
    Grpc,
    Tcp,
    Tls,
}

/// A service port and where it lands on the workload (`target_port` 0: a named port resolved per workload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    pub service_port: u16,
    pub target_port: u16,
    pub app_protocol: AppProtocol,
}

/// A workload: one pod with at least one IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// `<cluster>//Pod/<namespace>/<name>`, as istiod names pods.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    pub network: String,
    pub tunnel_protocol: TunnelProtocol,
    /// Empty for the default trust domain.
    pub trust_domain: String,
    pub service_account: String,
    pub waypoint: Option<WaypointAddress>,
    pub node: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    /// The Deployment (or other owner) name; the type is always POD, as istiod sends it.
    pub workload_name: String,
    /// `<namespace>/<hostname>` of each service selecting the pod, with the ports resolved for this pod.
    pub services: BTreeMap<String, Vec<PortMapping>>,
    /// Keys (`<namespace>/<name>`) of the selector-scoped policies that apply, then PeerAuthentication-derived ones.
    pub authorization_policies: Vec<String>,
    pub healthy: bool,
    pub cluster_id: String,
    pub host_network: bool,
    /// The pod's labels (not sent; kept for selectors and debugging).
    pub labels: StringMap,
    /// Region, zone and subzone, for locality-aware load balancing ([`pod_locality`]).
    pub locality: Locality,
}

/// Which IP families a service uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamilies {
    Automatic,
    Ipv4Only,
    Ipv6Only,
    Dual,
}

/// Locality scopes for load balancing (Istio's `LoadBalancing.Scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbScope {
    Region,
    Zone,
    Subzone,
    Node,
    Network,
}

/// How strictly the routing preference applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbMode {
    Unspecified,
    /// Only the preferred endpoints (`Local` internal traffic policy).
    Strict,
    /// Prefer closer endpoints, fall back to farther ones (traffic distribution).
    Failover,
}

/// Load-balancing preferences of a service (internal traffic policy, traffic distribution, not-ready endpoints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancing {
    pub routing_preference: Vec<LbScope>,
    pub mode: LbMode,
    /// `publishNotReadyAddresses`: unhealthy endpoints are used too.
    pub allow_unhealthy: bool,
}

/// A Kubernetes Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<PortMapping>,
    pub waypoint: Option<WaypointAddress>,
    pub ingress_use_waypoint: bool,
    pub ip_families: IpFamilies,
    pub load_balancing: Option<LoadBalancing>,
}

impl Service {
    /// `<namespace>/<hostname>`: the resource name and the key in workloads' `services`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// A routing object (VirtualService, DestinationRule, Gateway, HTTPRoute), carried for the waypoint.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingObject {
    pub origin: Origin,
    /// Its namespace (`default` when unset).
    pub namespace: String,
    pub object: RawObject,
}

/// The mesh as the controller serves it.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub options: Options,
    /// Workloads by uid (shared with the next build, which takes over those whose inputs did not change).
    pub workloads: BTreeMap<String, Arc<Workload>>,
    /// Services by `<namespace>/<hostname>`.
    pub services: BTreeMap<String, Service>,
    /// L4 policies by `<namespace>/<name>`.
    pub authorizations: BTreeMap<String, Authorization>,
    /// Waypoints by `<namespace>/<name>`.
    pub waypoints: BTreeMap<String, Waypoint>,
    /// Routing objects, in load order.
    pub routing: Vec<RoutingObject>,
    /// AuthorizationPolicies with `targetRef(s)`, which a waypoint enforces, by `<namespace>/<name>`.
    pub waypoint_policies: BTreeMap<String, super::objects::AuthorizationPolicy>,
    /// Declared service accounts, as `<namespace>/<name>`.
    pub service_accounts: BTreeSet<String>,
    /// Gateway API route conditions (`Accepted`, `ResolvedRefs`) per route and parentRef.
    pub route_conditions: Vec<RouteConditions>,
    status: Vec<StatusEntry>,
    /// What the next build may take over.
    reuse: Reuse,
}

/// Per-object status while building; a rejected object is not used further.
struct Recorder {
    entries: Vec<StatusEntry>,
}

impl Recorder {
    fn warn(&mut self, i: usize, msg: impl Into<String>) {
        let msg = msg.into();
        match &mut self.entries[i].outcome {
            Outcome::Ok => self.entries[i].outcome = Outcome::Warning(msg),
            Outcome::Warning(w) if !w.split("; ").any(|x| x == msg) => *w = format!("{w}; {msg}"),
            _ => {}
        }
    }

    fn reject(&mut self, i: usize, msg: impl Into<String>) {
        self.entries[i].outcome = Outcome::Error(msg.into());
    }

    fn ok(&self, i: usize) -> bool {
        !self.entries[i].outcome.is_error()
    }
}

impl Model {
    /// Every object and document read, in file order, with what happened to it.
    pub fn status(&self) -> &[StatusEntry] {
        &self.status
    }

    /// The conditions of every Gateway API route per parentRef, in file order.
    pub fn route_conditions(&self) -> &[RouteConditions] {
        &self.route_conditions
    }

    /// The rejected objects and documents.
    pub fn errors(&self) -> impl Iterator<Item = &StatusEntry> {
        self.status.iter().filter(|s| s.outcome.is_error())
    }

    /// Builds the model from what was read.
    pub fn build(snapshot: Snapshot, options: Options) -> Model {
        Self::build_after(snapshot, options, None)
    }

    /// Builds the model from what was read, taking over from `prev` every pod and workload whose inputs are the
    /// same objects (the result equals [`Model::build`]'s).
    pub fn build_after(snapshot: Snapshot, options: Options, prev: Option<&Model>) -> Model {
        let Snapshot { objects, skipped } = snapshot;
        let mut rec = Recorder {
            entries: objects
                .iter()
                .map(|l| StatusEntry {
                    origin: l.origin.clone(),
                    object: Some(ObjectRef::of(&l.object)),
                    outcome: Outcome::Ok,
                })
                .collect(),
        };
        // The first definition of an object wins; later ones are reported.
        let mut seen: std::collections::HashMap<(&str, &str, &str), usize> =
            std::collections::HashMap::with_capacity(objects.len());
        for (i, l) in objects.iter().enumerate() {
            let o = &l.object;
            match seen.entry((o.kind(), o.namespace(), o.metadata().name.as_str())) {
                std::collections::hash_map::Entry::Occupied(first) => {
                    rec.reject(i, format!("duplicate: already defined at {}", objects[*first.get()].origin))
                }
                std::collections::hash_map::Entry::Vacant(v) => drop(v.insert(i)),
            }
        }
        let objs: Vec<&Object> = objects.iter().map(|l| &l.object).collect();
        let context = Context::of(&options, &objects);
        let mut b = Builder {
            options,
            objs: &objs,
            loaded: &objects,
            rec: &mut rec,
            namespaces: BTreeMap::new(),
            nodes: BTreeMap::new(),
            by_kind: std::collections::HashMap::new(),
            prev: prev.map(|m| &m.reuse).filter(|r| r.applies_to(&context)),
            next: Reuse::new(context, objects.len()),
        };
        for (i, o) in objs.iter().enumerate() {
            b.by_kind.entry(o.kind()).or_default().push(i);
        }
        let mut model = b.build();
        model.reuse = b.next;
        let mut status = skipped;
        status.extend(rec.entries);
        status.sort_by(|a, b| a.origin.cmp(&b.origin));
        model.status = status;
        model
    }
}

/// Building state shared by the steps.
struct Builder<'a> {
    options: Options,
    objs: &'a [&'a Object],
    /// The same objects, shared: what reuse is keyed by.
    loaded: &'a [Arc<Loaded>],
    rec: &'a mut Recorder,
    /// Namespace metadata by name (implicit namespaces have none).
    namespaces: BTreeMap<String, (usize, ObjectMeta)>,
    /// Node labels by node name, for the locality of the pods on each node.
    nodes: BTreeMap<String, StringMap>,
    /// Object indices by kind, in order.
    by_kind: std::collections::HashMap<&'a str, Vec<usize>>,
    /// The previous build's results, when built in the same context.
    prev: Option<&'a Reuse>,
    /// This build's results, for the next.
    next: Reuse,
}

/// A pod, with the object it came from.
struct PodAt {
    /// Index of its object (the Pod, or the Deployment that stands for it).
    source: usize,
    /// Its place among the pods of that object.
    nth: usize,
    info: Arc<PodInfo>,
}

impl Builder<'_> {
    fn indices(&self, kind: &str) -> Vec<usize> {
        let all = self.by_kind.get(kind).map(Vec::as_slice).unwrap_or_default();
        all.iter().copied().filter(|&i| self.rec.ok(i)).collect()
    }

    fn ns_labels(&self, ns: &str) -> StringMap {
        self.namespaces.get(ns).map(|(_, m)| m.labels.clone()).unwrap_or_default()
    }

    fn build(&mut self) -> Model {
        let loaded = self.loaded;
        let o = self.options.clone();
        let mut model = Model { options: o.clone(), ..Model::default() };
        for i in self.indices("Namespace") {
            let m = self.objs[i].metadata();
            self.namespaces.insert(m.name.clone(), (i, m.clone()));
        }
        for i in self.indices("Node") {
            let m = self.objs[i].metadata();
            self.nodes.insert(m.name.clone(), m.labels.clone());
        }
        for i in self.indices("ServiceAccount") {
            model.service_accounts.insert(format!("{}/{}", self.objs[i].namespace(), self.objs[i].metadata().name));
        }
        for (i, l) in loaded.iter().enumerate() {
            if let (Object::Raw(raw), true) = (&l.object, self.rec.ok(i)) {
                let namespace = l.object.namespace().to_string();
                if waypoint::is_waypoint_gateway(raw) {
                    let w = waypoint::from_gateway(raw, &namespace, &o.domain_suffix);
                    model.waypoints.insert(w.key(), w);
                }
                model.routing.push(RoutingObject { origin: l.origin.clone(), namespace, object: raw.clone() });
            }
        }
        let pods = self.pods();
        let services = self.services(&mut model, &pods);
        self.route_conditions(&mut model, loaded);
        let policies = self.authorizations(&mut model);
        self.workloads(&mut model, &pods, &services, &policies);
        for i in self.indices("ServiceEntry") {
            self.rec.warn(i, "ServiceEntry is read but not yet translated into xDS");
        }
        model
    }

    /// Attaches the Gateway API routes to the model's Services and Gateways: their conditions,
    /// and a warning (or, for a route refused whole, an error) on their status lines.
    fn route_conditions(&mut self, model: &mut Model, loaded: &[Arc<Loaded>]) {
        let rec = &*self.rec;
        let ev = gateway_routes::evaluate(loaded, |i| rec.ok(i), &model.services, &self.options.domain_suffix);
        for (i, verdict) in ev.verdicts {
            match verdict {
                Verdict::Warn(m) => self.rec.warn(i, m),
                Verdict::Reject(m) => {
                    self.rec.reject(i, m);
                    model.routing.retain(|r| r.origin != loaded[i].origin);
                }
            }
        }
        model.route_conditions = ev.conditions;
    }

    /// Written pods (each parsed once while its object stays the same) and the pods Deployments stand for.
    fn pods(&mut self) -> Vec<PodAt> {
        let deployments: Vec<(&str, &super::objects::Deployment)> = self
            .indices("Deployment")
            .into_iter()
            .filter_map(|i| match self.objs[i] {
                Object::Deployment(d) => Some((self.objs[i].namespace(), d)),
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        for i in self.indices("Pod") {
            let Object::Pod(p) = self.objs[i] else { continue };
            let object = &self.loaded[i];
            let parsed = match self.prev.and_then(|r| r.pod(object)) {
                Some(known) => known,
                None => pods::from_pod(p, self.objs[i].namespace(), &deployments).map(Arc::new),
            };
            self.next.remember_pod(object, parsed.clone());
            match parsed {
                Ok(info) => out.push(PodAt { source: i, nth: 0, info }),
                Err(e) => self.rec.reject(i, e),
            }
        }
        for i in self.indices("Deployment") {
            let Object::Deployment(d) = self.objs[i] else { continue };
            match pods::from_deployment(d, self.objs[i].namespace()) {
                Ok(generated) if generated.is_empty() && d.spec.replicas != Some(0) => {
                    self.rec.warn(
                        i,
                        format!(
                            "no {} annotation: its pods have no IPs and are not workloads",
                            pods::POD_IPS_ANNOTATION
                        ),
                    );
                }
                Ok(generated) => out.extend(generated.into_iter().enumerate().map(|(nth, p)| PodAt {
                    source: i,
                    nth,
                    info: Arc::new(p),
                })),
                Err(e) => self.rec.reject(i, e),
            }
        }
        out
    }

    fn services(&mut self, model: &mut Model, pods: &[PodAt]) -> Vec<ServiceBuild> {
        let o = self.options.clone();
        // Names used as waypoints, so a Service can stand in for a waypoint Gateway.
        let mut referenced = BTreeSet::new();
        for i in (0..self.objs.len()).filter(|&i| self.rec.ok(i)) {
            let obj = self.objs[i];
            let ns = if obj.kind() == "Namespace" { obj.metadata().name.as_str() } else { obj.namespace() };
            if let Some(waypoint::UseWaypoint::Named { namespace, name }) =
                waypoint::use_waypoint(&obj.metadata().labels, ns)
            {
                referenced.insert(format!("{namespace}/{name}"));
            }
        }
        for i in self.indices("Service") {
            let obj = self.objs[i];
            let key = format!("{}/{}", obj.namespace(), obj.metadata().name);
            if referenced.contains(&key) && !model.waypoints.contains_key(&key) {
                let hostname = format!("{}.{}.svc.{}", obj.metadata().name, obj.namespace(), o.domain_suffix);
                let w =
                    waypoint::from_service(obj.namespace(), &obj.metadata().name, &hostname, &obj.metadata().labels);
                model.waypoints.insert(key, w);
            }
        }
        let waypoints = Waypoints { by_key: model.waypoints.clone() };
        let mut vips: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut out = Vec::new();
        for i in self.indices("Service") {
            let Object::Service(svc) = self.objs[i] else { continue };
            let ns = self.objs[i].namespace().to_string();
            let mut build = match service(svc, &ns, &o, i) {
                Ok(b) => b,
                Err(e) => {
                    self.rec.reject(i, e);
                    continue;
                }
            };
            if svc.spec.kind.as_deref() == Some("ExternalName") {
                self.rec.warn(i, "ExternalName services are not sent to ztunnel (as in Istio)");
                continue;
            }
            if let Some((vip, other)) = build.service.vips.iter().find_map(|v| vips.get(v).map(|o| (v, o))) {
                self.rec.reject(i, format!("cluster IP {vip} is already used by service {other}"));
                continue;
            }
            let ns_meta = self.namespaces.get(&ns).map(|(_, m)| m.clone()).unwrap_or_default();
            let key = format!("{ns}/{}", svc.metadata.name);
            let is_waypoint = waypoints.by_key.contains_key(&key);
            match waypoints.for_service(&svc.metadata.labels, &ns, &ns_meta.labels, is_waypoint) {
                Ok(w) => build.service.waypoint = w.map(|w| w.address.clone()),
                Err(e) => self.rec.warn(i, e),
            }
            if build.service.waypoint.is_some() {
                let flag = svc
                    .metadata
                    .labels
                    .get(INGRESS_USE_WAYPOINT_LABEL)
                    .or(ns_meta.labels.get(INGRESS_USE_WAYPOINT_LABEL));
                build.service.ingress_use_waypoint = flag.is_some_and(|v| parse_bool(v));
            }
            build.service.load_balancing = load_balancing(svc, &ns_meta);
            for v in &build.service.vips {
                vips.insert(*v, build.service.key());
            }
            out.push(build);
        }
        // Named target ports must exist on some selected pod to mean anything; report those that match none.
        for b in &out {
            for (p, name) in b.service.ports.iter().zip(&b.named_targets) {
                let Some(name) = name else { continue };
                let selected = pods
                    .iter()
                    .map(|p| &p.info)
                    .filter(|pod| pod.namespace == b.service.namespace && selects(&b.selector, &pod.labels));
                let mut selected = selected.peekable();
                if selected.peek().is_some() && selected.all(|pod| pods::named_port(&pod.spec, name).is_none()) {
                    self.rec.warn(
                        b.source,
                        format!("port {}: no selected pod has a container port named {name:?}", p.service_port),
                    );
                }
            }
        }
        for b in &out {
            model.services.insert(b.service.key(), b.service.clone());
        }
        out
    }

    /// One workload per pod with an IP; each pod whose inputs are the same objects as in the previous build takes
    /// over that build's workload (see [`super::reuse`]).
    fn workloads(&mut self, model: &mut Model, pods: &[PodAt], services: &[ServiceBuild], policies: &PolicyIndex) {
        self.next.set_waypoints(model.waypoints.clone());
        let prev = self.prev.filter(|r| r.same_waypoints(&model.waypoints));
        let waypoints = Waypoints { by_key: model.waypoints.clone() };
        // Each address → the pod that has it.
        let mut addresses: std::collections::HashMap<IpAddr, &PodInfo> = std::collections::HashMap::new();
        let mut namespace_warned = BTreeSet::new();
        let index = SelectorIndex::new(services);
        let uid = |pod: &PodInfo| format!("{}//Pod/{}/{}", self.options.cluster_id, pod.namespace, pod.name);
        for at in pods {
            let pod = &*at.info;
            if pod.ips.is_empty() || pod.terminal {
                continue;
            }
            if let Some((ip, other)) = pod.ips.iter().find_map(|ip| addresses.get(ip).map(|o| (ip, o))) {
                let msg = format!("pod {}: address {ip} is already used by {}", pod.name, uid(other));
                if pod.generated {
                    self.rec.warn(at.source, msg)
                } else {
                    self.rec.reject(at.source, msg)
                }
                continue;
            }
            let selecting = index.selecting(&pod.namespace, &pod.labels);
            let selecting_objects: Vec<usize> = selecting.iter().map(|s| s.source).collect();
            let key = (reuse::address(&self.loaded[at.source]), at.nth);
            let keys = policies.keys_for(&pod.namespace, &pod.labels);
            let source = &self.loaded[at.source];
            let known = prev.and_then(|r| r.workload(key, source, &selecting_objects, self.loaded));
            let built = match known {
                Some(known) => known.with_policies(keys),
                None => {
                    let (workload, warnings) = self.workload(model, pod, uid(pod), &selecting, &waypoints, keys);
                    let inputs = Inputs::new(source, &selecting_objects, self.loaded);
                    Arc::new(Built { inputs, workload: Arc::new(workload), warnings })
                }
            };
            for w in &built.warnings {
                match w {
                    reuse::Warning::Pod(msg) => self.rec.warn(at.source, msg.clone()),
                    reuse::Warning::Namespace(msg) => {
                        if let Some((ni, _)) = self.namespaces.get(&pod.namespace) {
                            if namespace_warned.insert(*ni) {
                                self.rec.warn(*ni, msg.clone());
                            }
                        }
                    }
                }
            }
            for ip in &pod.ips {
                addresses.insert(*ip, pod);
            }
            model.workloads.insert(built.workload.uid.clone(), built.workload.clone());
            self.next.remember_workload(key, built);
        }
    }

    /// Builds the workload of `pod`, selected by `selecting`, listing the policies `keys`; with the warnings to
    /// record (a pure function of its inputs, so that it can be reused).
    fn workload(
        &self,
        model: &Model,
        pod: &PodInfo,
        uid: String,
        selecting: &[&ServiceBuild],
        waypoints: &Waypoints,
        keys: Vec<String>,
    ) -> (Workload, Vec<reuse::Warning>) {
        let o = &self.options;
        let mut warnings = Vec::new();
        let ns_labels = self.ns_labels(&pod.namespace);
        let service_account =
            pod.spec.service_account_name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into());
        if service_account != "default"
            && !model.service_accounts.contains(&format!("{}/{service_account}", pod.namespace))
        {
            warnings.push(reuse::Warning::Pod(format!(
                "service account {}/{service_account} is not defined",
                pod.namespace
            )));
        }
        // A pod is a waypoint instance when it carries a waypoint Gateway's name, or a Service that is a waypoint
        // selects it.
        let is_instance = pod
            .labels
            .get(GATEWAY_NAME_LABEL)
            .is_some_and(|g| waypoints.by_key.contains_key(&format!("{}/{g}", pod.namespace)))
            || selecting
                .iter()
                .any(|s| waypoints.by_key.contains_key(&format!("{}/{}", s.service.namespace, s.service.name)));
        let waypoint = match waypoints.for_workload(&pod.labels, &pod.namespace, &ns_labels, is_instance) {
            Ok(w) => w.map(|w| w.address.clone()),
            Err(e) => {
                warnings.push(reuse::Warning::Pod(format!("pod {}: {e}", pod.name)));
                None
            }
        };
        if let Some(waypoint::UseWaypoint::Named { namespace, name }) =
            waypoint::use_waypoint(&ns_labels, &pod.namespace)
        {
            if !waypoints.by_key.contains_key(&format!("{namespace}/{name}")) {
                warnings.push(reuse::Warning::Namespace(format!(
                    "waypoint {namespace}/{name} not found (no istio-waypoint Gateway or Service)"
                )));
            }
        }
        let mut joined = BTreeMap::new();
        for s in selecting {
            let ports = s.service.ports.iter().zip(&s.named_targets).filter_map(|(p, named)| match named {
                None => Some(*p),
                Some(name) => pods::named_port(&pod.spec, name).map(|t| PortMapping { target_port: t, ..*p }),
            });
            joined.insert(s.service.key(), ports.collect());
        }
        let (canonical_name, canonical_revision) = canonical(&pod.labels, &pod.workload_name);
        let workload = Workload {
            uid,
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            addresses: pod.ips.clone(),
            network: o.network.clone(),
            tunnel_protocol: if captured(pod, &ns_labels) { TunnelProtocol::Hbone } else { TunnelProtocol::None },
            trust_domain: if o.trust_domain == "cluster.local" { String::new() } else { o.trust_domain.clone() },
            service_account,
            waypoint,
            node: pod.spec.node_name.clone().unwrap_or_default(),
            canonical_name,
            canonical_revision,
            workload_name: pod.workload_name.clone(),
            services: joined,
            authorization_policies: keys,
            healthy: pod.ready,
            cluster_id: o.cluster_id.clone(),
            host_network: pod.spec.host_network,
            labels: pod.labels.clone(),
            locality: pod_locality(&pod.labels, pod.spec.node_name.as_ref().and_then(|n| self.nodes.get(n))),
        };
        (workload, warnings)
    }

    /// Converts the AuthorizationPolicies and PeerAuthentications into the model's policies; returns what
    /// decides which of them each workload lists.
    fn authorizations(&mut self, model: &mut Model) -> PolicyIndex {
        let root = self.options.root_namespace.clone();
        let mut selectors: Vec<(String, String, StringMap)> = Vec::new(); // (key, namespace, selector)
        for i in self.indices("AuthorizationPolicy") {
            let Object::AuthorizationPolicy(ap) = self.objs[i] else { continue };
            let ns = self.objs[i].namespace();
            match authz::convert_authorization_policy(ap, ns, &root) {
                Err(e) => self.rec.reject(i, e),
                Ok(Converted::ForWaypoint) => {
                    model.waypoint_policies.insert(format!("{ns}/{}", ap.metadata.name), ap.clone());
                }
                Ok(Converted::Policy { authorization, selector, warning }) => {
                    if let Some(w) = warning {
                        self.rec.warn(i, w);
                    }
                    if let Some(sel) = selector {
                        selectors.push((authorization.key(), ns.to_string(), sel));
                    }
                    model.authorizations.insert(authorization.key(), authorization);
                }
            }
        }
        let mut peer_authns: Vec<PeerAuthn> = Vec::new();
        for i in self.indices("PeerAuthentication") {
            let Object::PeerAuthentication(pa) = self.objs[i] else { continue };
            match authz::parse_peer_authentication(pa, self.objs[i].namespace(), i) {
                Ok(p) => peer_authns.push(p),
                Err(e) => self.rec.reject(i, e),
            }
        }
        if !peer_authns.is_empty() {
            let p = authz::static_strict_policy(&root);
            model.authorizations.insert(p.key(), p);
        }
        for pa in &peer_authns {
            if let Some(p) = authz::convert_peer_authentication(pa, &peer_authns, &root) {
                selectors.push((p.key(), pa.namespace.clone(), pa.selector.clone().unwrap_or_default()));
                model.authorizations.insert(p.key(), p);
            }
        }
        PolicyIndex { selectors, peer_authns, root_namespace: root }
    }
}

/// A pod's locality as istiod finds it: the pod's `istio-locality` label (`region.zone.subzone`), else its
/// node's topology labels (the deprecated `failure-domain.beta.kubernetes.io/*` ones too).
pub fn pod_locality(pod_labels: &StringMap, node_labels: Option<&StringMap>) -> Locality {
    if let Some(l) = pod_labels.get("istio-locality").filter(|l| !l.is_empty()) {
        let mut parts = l.splitn(3, '.').map(str::to_string);
        let mut next = || parts.next().unwrap_or_default();
        return Locality { region: next(), zone: next(), subzone: next() };
    }
    let Some(labels) = node_labels else { return Locality::default() };
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned().unwrap_or_default();
    Locality {
        region: first(&["topology.kubernetes.io/region", "failure-domain.beta.kubernetes.io/region"]),
        zone: first(&["topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone"]),
        subzone: first(&["topology.istio.io/subzone"]),
    }
}

/// Istio's canonical service name and revision labels, in their order of precedence.
fn canonical(labels: &StringMap, workload_name: &str) -> (String, String) {
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned();
    let name = first(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]);
    let revision = first(&["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"]);
    (name.unwrap_or_else(|| workload_name.to_string()), revision.unwrap_or_else(|| "latest".into()))
}

/// Whether the node proxy captures the pod (see the module docs).
fn captured(pod: &PodInfo, ns_labels: &StringMap) -> bool {
    if pod.spec.host_network {
        return false;
    }
    if pod.labels.get(TUNNEL_LABEL).is_some_and(|t| t.split(',').any(|x| x == "http")) {
        return true;
    }
    match pod.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        Some("none") => return false,
        Some("ambient") => return true,
        _ => {}
    }
    pod.annotations.get(REDIRECTION_ANNOTATION).map(String::as_str) == Some("enabled")
        || ns_labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("ambient")
}

fn parse_bool(v: &str) -> bool {
    matches!(v, "1" | "t" | "T" | "TRUE" | "true" | "True")
}
