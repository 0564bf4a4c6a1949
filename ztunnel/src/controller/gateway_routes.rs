//! Gateway API route conditions in the controller's status. The controller carries
//! HTTPRoutes, GRPCRoutes and TCPRoutes for the waypoints and ingress gateways; here they are
//! attached (by the same translation layer the proxies run, `routing::gateway_api`) to the
//! Services and Gateways of the model, so `ztunnel controller --check` and
//! [`super::Controller::route_conditions`] say, per route and parentRef, what Kubernetes
//! would write in the route's `status.parents`: `Accepted` and `ResolvedRefs` with their
//! reasons. A route with a condition that is not as it should be is a warning on its status
//! line; a route the API server's validation would refuse is an error.
use std::collections::BTreeMap;
use std::fmt;

use serde_yaml_ng::{Mapping, Value};

use super::model::Service;
use super::objects::{api_group, Object, ObjectRef, RawObject};
use super::source::Loaded;
use super::status::Origin;
use crate::routing::gateway_api::{self, Cluster, Condition, ServicePort};

/// The conditions of one route for one of its parentRefs.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConditions {
    pub origin: Origin,
    pub route: ObjectRef,
    /// `Service default/reviews:9080`, `Gateway istio-ingress/gw/http`.
    pub parent: String,
    pub conditions: Vec<Condition>,
}

impl fmt::Display for RouteConditions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: parent {}: ", self.origin, self.route, self.parent)?;
        for (i, c) in self.conditions.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

/// What a route's (or a Gateway's) status line becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    Warn(String),
    Reject(String),
}

/// The route conditions of the model, and the verdicts on the objects they concern (by
/// index in `loaded`).
#[derive(Debug, Default)]
pub(super) struct Evaluation {
    pub conditions: Vec<RouteConditions>,
    pub verdicts: Vec<(usize, Verdict)>,
}

/// The Gateway API kinds read here.
fn is_gateway_api(o: &RawObject) -> bool {
    api_group(&o.api_version) == gateway_api::types::GROUP
        && matches!(o.kind.as_str(), "Gateway" | "HTTPRoute" | "GRPCRoute" | "TCPRoute" | "ReferenceGrant")
}

/// The object as a YAML document, as the translation layer reads documents.
fn document(o: &RawObject, namespace: &str) -> Value {
    let mut meta = Mapping::new();
    meta.insert("name".into(), o.metadata.name.clone().into());
    meta.insert("namespace".into(), namespace.into());
    if let Some(t) = &o.metadata.creation_timestamp {
        meta.insert("creationTimestamp".into(), t.clone().into());
    }
    let mut d = Mapping::new();
    d.insert("apiVersion".into(), o.api_version.clone().into());
    d.insert("kind".into(), o.kind.clone().into());
    d.insert("metadata".into(), Value::Mapping(meta));
    d.insert("spec".into(), o.spec.clone());
    Value::Mapping(d)
}

/// Attaches the Gateway API routes among `loaded` (those `ok` says are still in) to the
/// model's `services` (keyed `namespace/hostname`) and the Gateways, in a cluster whose
/// Service hostnames end in `domain`.
pub(super) fn evaluate(
    loaded: &[std::sync::Arc<Loaded>],
    ok: impl Fn(usize) -> bool,
    services: &BTreeMap<String, Service>,
    domain: &str,
) -> Evaluation {
    let mut cluster = Cluster::new();
    cluster.cluster_domain = domain.to_string();
    let mut docs = vec![];
    let mut index: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for (i, l) in loaded.iter().enumerate().filter(|(i, _)| ok(*i)) {
        let ns = l.object.namespace().to_string();
        match &l.object {
            Object::Namespace(n) => {
                cluster.namespace_labels.insert(n.metadata.name.clone(), n.metadata.labels.clone());
            }
            Object::Service(s) => {
                let key = format!("{ns}/{}.{ns}.svc.{domain}", s.metadata.name);
                if services.contains_key(&key) {
                    let ports =
                        s.spec.ports.iter().map(|p| ServicePort { name: p.name.clone(), port: p.port }).collect();
                    cluster.add_service(&ns, &s.metadata.name, ports);
                }
            }
            Object::Raw(r) if is_gateway_api(r) => {
                docs.push(document(r, &ns));
                index.insert((r.kind.clone(), ns, r.metadata.name.clone()), i);
            }
            _ => {}
        }
    }
    let gateways = Cluster::from_docs(&docs);
    cluster.gateways = gateways.gateways;
    cluster.rejected = gateways.rejected;
    let routes = gateway_api::load(&docs, &cluster);

    let mut out = Evaluation::default();
    let find = |kind: &str, name: &str| {
        let (ns, n) = name.split_once('/').unwrap_or(("default", name));
        index.get(&(kind.to_string(), ns.to_string(), n.to_string())).copied()
    };
    for e in &routes.rejected {
        let (kind, name, reason) = match e {
            gateway_api::Invalid::ApiVersion { kind, name, api_version } => {
                (kind, name, format!("apiVersion {api_version:?} is not supported"))
            }
            gateway_api::Invalid::Spec { kind, name, reason } => (kind, name, format!("spec does not parse: {reason}")),
            gateway_api::Invalid::Validation { kind, name, reason } => (kind, name, reason.clone()),
            // A parent whose routes do not compile: its routes stay listed with their conditions.
            gateway_api::Invalid::Parent { .. } => continue,
        };
        let Some(i) = find(kind, name) else { continue };
        // A Gateway this layer cannot read may still be a waypoint the model knows: a warning.
        let verdict = if kind == "Gateway" { Verdict::Warn(reason) } else { Verdict::Reject(reason) };
        out.verdicts.push((i, verdict));
    }
    let mut with_status: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for s in &routes.statuses {
        let Some(i) = find(s.route.kind.as_str(), &format!("{}/{}", s.route.namespace, s.route.name)) else {
            continue;
        };
        let problems = with_status.entry(i).or_default();
        let parent = s.parent_text();
        if !s.healthy() {
            let bad: Vec<String> = s
                .conditions
                .iter()
                .filter(|c| c.status == (c.kind == gateway_api::ConditionType::PartiallyInvalid))
                .map(|c| c.to_string())
                .collect();
            problems.push(format!("parent {parent}: {}", bad.join(", ")));
        }
        out.conditions.push(RouteConditions {
            origin: loaded[i].origin.clone(),
            route: ObjectRef::of(&loaded[i].object),
            parent,
            conditions: s.conditions.clone(),
        });
    }
    for ((kind, _, _), i) in &index {
        let route = matches!(kind.as_str(), "HTTPRoute" | "GRPCRoute" | "TCPRoute");
        if !route || out.verdicts.iter().any(|(j, _)| j == i) {
            continue;
        }
        match with_status.get(i) {
            None => out.verdicts.push((
                *i,
                Verdict::Warn(format!(
                    "no parentRef names a Service or a Gateway of class {}: the route applies nowhere",
                    gateway_api::GATEWAY_CLASSES.join(" or ")
                )),
            )),
            Some(problems) if !problems.is_empty() => out.verdicts.push((*i, Verdict::Warn(problems.join("; ")))),
            Some(_) => {}
        }
    }
    out.conditions.sort_by(|a, b| (&a.origin, &a.parent).cmp(&(&b.origin, &b.parent)));
    out
}
