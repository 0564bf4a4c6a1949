//! Reading routing objects from Kubernetes YAML: VirtualServices and DestinationRules of
//! `networking.istio.io` v1, v1beta1 or v1alpha3 (one shape). Each object is compiled or
//! rejected on its own, with its name and reason, so one bad object costs only itself.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Deserialize;

use super::compile::{compile, Invalid, Router};
use super::spec::VirtualService;
use super::traffic_policy::{self, DrPolicy, TrafficPolicy};

/// The API versions whose VirtualService and DestinationRule shape we read.
pub const API_VERSIONS: [&str; 3] =
    ["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"];

/// `spec` of a DestinationRule, as far as routing needs it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DestinationRule {
    pub host: String,
    /// Load balancing, connection pool, outlier detection and TLS for the host.
    #[serde(rename = "trafficPolicy")]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
}

/// A named subset: the endpoints carrying all of `labels`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Overrides the DestinationRule's policy for this subset (see [`traffic_policy`]).
    #[serde(rename = "trafficPolicy")]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// What a set of YAML documents holds for routing.
#[derive(Debug, Default)]
pub struct RoutingObjects {
    /// `namespace/name` → compiled VirtualService.
    pub routers: BTreeMap<String, Router>,
    /// host → subset name → labels.
    pub subsets: BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>,
    /// host → validated traffic policies of its DestinationRules (hosts without any are absent:
    /// `traffic_policy::EffectivePolicy::default()` applies); `traffic_policy::effective` resolves one.
    pub policies: BTreeMap<String, Arc<DrPolicy>>,
    /// Objects rejected, each with its name and reason.
    pub rejected: Vec<Invalid>,
}

/// Reads every VirtualService and DestinationRule in `docs` (other kinds are skipped):
/// DestinationRules first, so VirtualServices are checked against their subsets.
pub fn load(docs: &[serde_yaml_ng::Value]) -> RoutingObjects {
    let mut out = RoutingObjects::default();
    let of_kind = |kind: &'static str| docs.iter().filter(move |d| d["kind"] == kind);
    for d in of_kind("DestinationRule") {
        let name = key(d);
        match read::<DestinationRule>(d) {
            Ok(dr) if dr.host.is_empty() => out.rejected.push(Invalid { name, reason: "host is empty".into() }),
            Ok(dr) => {
                let mut seen = BTreeSet::new();
                if let Some(dup) = dr.subsets.iter().find(|s| !seen.insert(s.name.as_str())) {
                    out.rejected.push(Invalid { name, reason: format!("subset {} is defined twice", dup.name) });
                    continue;
                }
                let policies: Vec<_> =
                    dr.subsets.iter().map(|s| (s.name.as_str(), s.traffic_policy.as_ref())).collect();
                match DrPolicy::compile(dr.traffic_policy.as_ref(), &policies) {
                    Ok(p) => traffic_policy::insert(&mut out.policies, &dr.host, p),
                    Err(e) => {
                        out.rejected.push(Invalid { name, reason: e.to_string() });
                        continue;
                    }
                }
                let entry = out.subsets.entry(dr.host.clone()).or_default();
                for s in dr.subsets {
                    entry.insert(s.name, s.labels);
                }
            }
            Err(reason) => out.rejected.push(Invalid { name, reason }),
        }
    }
    let known: BTreeMap<String, BTreeSet<String>> =
        out.subsets.iter().map(|(h, s)| (h.clone(), s.keys().cloned().collect())).collect();
    for d in of_kind("VirtualService") {
        let name = key(d);
        match read::<VirtualService>(d) {
            Ok(vs) => match compile(&name, &vs, &known) {
                Ok(r) => {
                    out.routers.insert(name, r);
                }
                Err(e) => out.rejected.push(e),
            },
            Err(reason) => out.rejected.push(Invalid { name, reason }),
        }
    }
    out
}

/// `namespace/name` of an object (`default` when it names none).
fn key(d: &serde_yaml_ng::Value) -> String {
    let ns = d["metadata"]["namespace"].as_str().unwrap_or("default");
    format!("{ns}/{}", d["metadata"]["name"].as_str().unwrap_or("?"))
}

fn read<T: for<'de> Deserialize<'de>>(d: &serde_yaml_ng::Value) -> Result<T, String> {
    let api = d["apiVersion"].as_str().unwrap_or_default();
    if !API_VERSIONS.contains(&api) {
        return Err(format!("apiVersion {api:?} is not one of {}", API_VERSIONS.join(", ")));
    }
    serde_yaml_ng::from_value(d["spec"].clone()).map_err(|e| format!("spec: {e}"))
}
