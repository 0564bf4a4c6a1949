//! The waypoint's L7 configuration: VirtualServices, DestinationRules and targeted
//! AuthorizationPolicies read from a directory of Kubernetes YAML, re-read on change, and
//! the Gateway API routes there ([`super::gateway_routes`]), resolved again when the mesh's
//! Services change.
//!
//! Each object is compiled or rejected on its own, with its name and reason (logged and
//! counted). A rejected VirtualService or policy that had a valid earlier version keeps that
//! version in force; a policy rejected with no earlier version makes its targets deny every
//! request, so a typo in a policy never opens what it was meant to close.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_yaml_ng::Value;
use tracing::{info, warn};

use super::authz::{self, L7Policy, Target};
use super::gateway_routes::{GatewayApi, MeshServices};
use crate::controller::objects::AuthorizationPolicy;
use crate::metrics::Metrics;
use crate::routing::objects::{self, RoutingObjects};
use crate::routing::{Invalid, Router};

/// One consistent L7 configuration.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// `namespace/name` → compiled VirtualService.
    pub routers: BTreeMap<String, Router>,
    /// host → subset → labels, from DestinationRules.
    pub subsets: BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>,
    /// `namespace/name` → compiled L7 policy.
    pub policies: BTreeMap<String, L7Policy>,
    /// Targets of policies rejected with no earlier valid version (they deny everything);
    /// `None` in the list: a rejected policy whose targets could not be read (everything denies).
    pub poisoned: Vec<Option<Target>>,
    /// What was rejected in the last load, with reasons.
    pub rejected: Vec<Invalid>,
    /// Istio Gateways and TLS Secrets, for an ingress gateway.
    pub ingress: crate::routing::ingress::IngressObjects,
    /// host → DestinationRule traffic policies (load balancing, connection pool, outliers).
    pub traffic_policies: BTreeMap<String, Arc<crate::routing::traffic_policy::DrPolicy>>,
    /// Gateway API routes (HTTPRoute, GRPCRoute, TCPRoute) with the Gateways and
    /// ReferenceGrants they depend on, resolved against the mesh's Services.
    pub gateway_api: GatewayApi,
}

impl RouteTable {
    /// Compiles `docs`, keeping `previous` versions of objects that are now rejected; Gateway
    /// API routes are resolved against the Services `previous` was (and those in `docs`).
    pub fn load(docs: &[Value], previous: &RouteTable) -> RouteTable {
        Self::load_with_services(docs, previous, previous.gateway_api.services.clone())
    }

    /// [`Self::load`], with Gateway API routes resolved against the state store's `services`
    /// (routes attach to them and name them as backends).
    pub fn load_with_services(docs: &[Value], previous: &RouteTable, services: Arc<MeshServices>) -> RouteTable {
        let RoutingObjects { mut routers, subsets, mut rejected, policies: traffic_policies } = objects::load(docs);
        for bad in &rejected {
            if let Some(old) = previous.routers.get(&bad.name) {
                routers.insert(bad.name.clone(), old.clone());
            }
        }
        let mut policies = BTreeMap::new();
        let mut poisoned = Vec::new();
        for d in docs.iter().filter(|d| d["kind"] == "AuthorizationPolicy") {
            let ns = d["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
            let name = format!("{ns}/{}", d["metadata"]["name"].as_str().unwrap_or("?"));
            let compiled = serde_yaml_ng::from_value::<AuthorizationPolicy>(d.clone())
                .map_err(|e| format!("spec: {e}"))
                .and_then(|ap| authz::compile(&ap, &ns));
            match compiled {
                Ok(Some(p)) => {
                    policies.insert(name, p);
                }
                Ok(None) => {}
                Err(reason) => {
                    match previous.policies.get(&name) {
                        Some(old) => {
                            policies.insert(name.clone(), old.clone());
                        }
                        None => poisoned.extend(targets_of(d, &ns)),
                    }
                    rejected.push(Invalid { name, reason });
                }
            }
        }
        let mut ingress = crate::routing::ingress::load(docs);
        for bad in &ingress.rejected {
            if let Some(old) = previous.ingress.gateways.get(&bad.name) {
                ingress.gateways.insert(bad.name.clone(), old.clone());
            }
            if let Some(old) = previous.ingress.secrets.get(&bad.name) {
                ingress.secrets.insert(bad.name.clone(), old.clone());
            }
        }
        rejected.extend(ingress.rejected.iter().cloned());
        let (gateway_api, refused) = super::gateway_routes::load(docs, &previous.gateway_api, services);
        rejected.extend(refused);
        RouteTable { routers, subsets, policies, poisoned, rejected, ingress, traffic_policies, gateway_api }
    }

    /// The VirtualService for a service: the first (by name) in the service's own namespace
    /// whose hosts name it. VirtualServices of other namespaces are not used, so one
    /// namespace cannot route (or mirror) another's traffic.
    pub fn router_for(&self, service: &crate::state::Service) -> Option<&Router> {
        let in_namespace =
            |name: &str| name.strip_prefix(service.namespace.as_str()).is_some_and(|n| n.starts_with('/'));
        self.routers
            .iter()
            .find(|(name, r)| in_namespace(name) && r.for_mesh() && r.serves(&service.hostname))
            .map(|(_, r)| r)
    }

    /// The VirtualService bound to one of `gateways` (`(namespace, name)`) whose hosts match
    /// the ingress request's `host` (no port), in name order.
    pub fn router_for_gateway(&self, gateways: &[(String, String)], host: &str) -> Option<&Router> {
        self.routers.values().find(|r| gateways.iter().any(|(ns, n)| r.bound_to(ns, n)) && r.serves_external(host))
    }

    /// Which DestinationRule's policy applies to `host` (`None`: no rule, the defaults).
    pub fn traffic_policy_index(&self, host: &str) -> Option<usize> {
        self.destination_rule(host).map(|(i, _)| i)
    }

    /// The DestinationRule policy for `host` (a short name or FQDN), with its position.
    fn destination_rule(&self, host: &str) -> Option<(usize, &crate::routing::traffic_policy::DrPolicy)> {
        let (i, (_, p)) = self.traffic_policies.iter().enumerate().find(|(_, (h, _))| short(h) == short(host))?;
        Some((i, p))
    }

    /// The traffic policy for requests to `subset` of `host` on `port`, by Istio's override
    /// rules; the defaults when no DestinationRule covers the host.
    pub fn traffic_policy(
        &self,
        host: &str,
        subset: Option<&str>,
        port: u16,
    ) -> crate::routing::traffic_policy::EffectivePolicy {
        self.destination_rule(host).map(|(_, p)| p.effective(subset, port)).unwrap_or_default()
    }

    /// The labels of `subset` of `host` (a short name or FQDN of the same service).
    pub fn subset_labels(&self, host: &str, subset: &str) -> Option<&BTreeMap<String, String>> {
        self.subsets.iter().find(|(h, _)| short(h) == short(host)).and_then(|(_, s)| s.get(subset))
    }

    /// Whether a rejected policy makes requests to `service` (or through `waypoint`) deny.
    pub fn poisoned_for(&self, service: (&str, &str), waypoint: (&str, &str)) -> bool {
        self.poisoned.iter().any(|t| match t {
            None => true,
            Some(Target::Service { namespace, name }) => (namespace.as_str(), name.as_str()) == service,
            Some(Target::Gateway { namespace, name }) => (namespace.as_str(), name.as_str()) == waypoint,
        })
    }
}

/// The targets a rejected policy names, as far as they can be read (`None`: unknown, so all).
fn targets_of(d: &Value, ns: &str) -> Vec<Option<Target>> {
    let spec = &d["spec"];
    let refs: Vec<&Value> =
        spec.get("targetRef").into_iter().chain(spec["targetRefs"].as_sequence().into_iter().flatten()).collect();
    if refs.is_empty() {
        // A selector policy is the node proxies' business; a document we could not read at
        // all might have been a waypoint policy: deny.
        return if spec.get("selector").is_some() { vec![] } else { vec![None] };
    }
    refs.into_iter()
        .map(|r| {
            let name = r["name"].as_str()?.to_string();
            let namespace = r["namespace"].as_str().unwrap_or(ns).to_string();
            match r["kind"].as_str()? {
                "Service" => Some(Target::Service { namespace, name }),
                "Gateway" => Some(Target::Gateway { namespace, name }),
                _ => None,
            }
        })
        .collect()
}

/// A host's first label: DestinationRules name a service by short name or FQDN alike.
fn short(h: &str) -> &str {
    h.split('.').next().unwrap_or(h)
}

/// Every YAML document under `dir` (a file or a directory, `*.yaml`/`*.yml`, in path
/// order), with the documents that could not be read as `file: reason`.
pub fn read_documents(dir: &Path) -> (Vec<Value>, Vec<String>) {
    let (mut docs, mut errors) = (Vec::new(), Vec::new());
    let mut files = Vec::new();
    if dir.is_file() {
        files.push(dir.to_path_buf());
    } else {
        match std::fs::read_dir(dir) {
            Ok(rd) => files.extend(rd.flatten().map(|e| e.path()).filter(|p| {
                p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                    && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })),
            Err(e) => errors.push(format!("{}: {e}", dir.display())),
        }
    }
    files.sort();
    for f in files {
        let text = match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{}: {e}", f.display()));
                continue;
            }
        };
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            match <Value as serde::Deserialize>::deserialize(doc) {
                Ok(Value::Null) => {}
                Ok(v) => docs.push(v),
                Err(e) => {
                    // The document iterator does not recover from a syntax error (it would
                    // yield the same error forever): the rest of the file is unread.
                    errors.push(format!("{} document {i}: {e}", f.display()));
                    break;
                }
            }
        }
    }
    (docs, errors)
}

/// The current table, replaced whole on each reload.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    current: Arc<RwLock<Arc<RouteTable>>>,
    /// Whether one read has applied (until then, an unreadable config denies everything).
    loaded: Arc<std::sync::atomic::AtomicBool>,
    /// What the table is built from; held while a table is built, so a directory read and a
    /// change of the mesh's Services never race.
    inputs: Arc<std::sync::Mutex<Inputs>>,
}

/// The last documents applied and the state store's Services.
#[derive(Debug, Default)]
struct Inputs {
    docs: Option<Arc<Vec<Value>>>,
    services: Arc<MeshServices>,
}

impl Routes {
    /// The table in force.
    pub fn table(&self) -> Arc<RouteTable> {
        self.current.read().expect("routes lock").clone()
    }

    /// The config dump: what is in force and what was rejected, with reasons.
    pub fn status_json(&self) -> serde_json::Value {
        let t = self.table();
        serde_json::json!({
            "virtualServices": t.routers.keys().collect::<Vec<_>>(),
            "destinationRuleHosts": t.subsets.keys().collect::<Vec<_>>(),
            "authorizationPolicies": t.policies.keys().collect::<Vec<_>>(),
            "gatewayApi": t.gateway_api.status_json(),
            "rejected": t.rejected.iter().map(|r| serde_json::json!({"name": r.name, "reason": r.reason})).collect::<Vec<_>>(),
        })
    }

    /// Loads `dir` now (counting rejections in `metrics`).
    pub fn reload(&self, dir: &Path, metrics: &Metrics) {
        let (docs, errors) = read_documents(dir);
        for e in &errors {
            warn!(error = %e, "unreadable YAML");
            metrics.config_rejected("document");
        }
        if !errors.is_empty() {
            // A document that cannot be read may have been a policy: nothing of this read is
            // applied. Before any good read, that means denying everything.
            let mut current = self.current.write().expect("routes lock");
            if !self.loaded.load(std::sync::atomic::Ordering::Acquire) {
                *current = Arc::new(RouteTable { poisoned: vec![None], ..Default::default() });
            }
            warn!("L7 config not applied: the previous one stays in force");
            return;
        }
        self.loaded.store(true, std::sync::atomic::Ordering::Release);
        let mut inputs = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        let docs = Arc::new(docs);
        inputs.docs = Some(docs.clone());
        let table = RouteTable::load_with_services(&docs, &self.table(), inputs.services.clone());
        for bad in &table.rejected {
            warn!(object = %bad.name, reason = %bad.reason, "L7 object rejected; the previous version (if any) stays");
            metrics.config_rejected("l7");
        }
        info!(
            virtual_services = table.routers.len(),
            policies = table.policies.len(),
            gateway_api_parents = table.gateway_api.routes.parents.len(),
            "L7 config applied"
        );
        *self.current.write().expect("routes lock") = Arc::new(table);
    }

    /// Resolves Gateway API routes against `services` (the state store's) from now on; when
    /// they differ from the last ones, the last documents are compiled again (their
    /// rejections were logged and counted when they were read).
    pub fn use_services(&self, services: MeshServices) {
        let mut inputs = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        if *inputs.services == services {
            return;
        }
        inputs.services = Arc::new(services);
        let Some(docs) = inputs.docs.clone() else { return };
        let table = RouteTable::load_with_services(&docs, &self.table(), inputs.services.clone());
        info!(services = inputs.services.len(), "mesh Services changed: Gateway API routes resolved again");
        *self.current.write().expect("routes lock") = Arc::new(table);
    }

    /// Follows the Services of `state` (local config or xDS) for [`Self::use_services`].
    pub async fn follow_services(self, state: Arc<crate::state::StateStore>) {
        let mut changed = state.subscribe();
        loop {
            self.use_services(super::gateway_routes::mesh_services(&state.snapshot()));
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// Re-reads `dir` whenever a file in it changes (polled).
    pub async fn follow(self, dir: PathBuf, metrics: Arc<Metrics>) {
        let mut last = stamp(&dir);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = stamp(&dir);
            if now != last {
                last = now;
                self.reload(&dir, &metrics);
            }
        }
    }
}

/// Names, sizes and modification times of the YAML files under `dir`.
fn stamp(dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut out: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => {
            rd.flatten().filter_map(|e| e.metadata().ok().map(|m| (e.path(), m.len(), m.modified().ok()))).collect()
        }
        Err(_) => {
            std::fs::metadata(dir).map(|m| vec![(dir.to_path_buf(), m.len(), m.modified().ok())]).unwrap_or_default()
        }
    };
    out.sort();
    out
}
