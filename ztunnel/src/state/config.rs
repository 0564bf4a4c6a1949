//! Istio ztunnel's local-config YAML (`LOCAL_XDS_PATH`): `{workloads, services, policies}`,
//! parsed and validated entry by entry so an error names the bad item. A rejected policy is
//! also kept as an [`InvalidPolicy`] so the workloads it would select fail closed.
use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::policy::{parse_policy, Authorization, InvalidPolicy};

/// How a workload is reached: through HBONE (mesh member) or plain TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum WorkloadProtocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "HBONE")]
    Hbone,
}

/// A pod (or VM) the mesh knows about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_sa")]
    pub service_account: String,
    #[serde(default)]
    pub workload_ips: Vec<IpAddr>,
    #[serde(default, alias = "tunnelProtocol")]
    pub protocol: WorkloadProtocol,
    #[serde(default)]
    pub node: String,
    /// Empty unless the config sets it: the agent's own trust domain then applies.
    #[serde(default)]
    pub trust_domain: String,
    /// `"<namespace>/<hostname>"` → service port → target port.
    #[serde(default)]
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// Policies selecting this workload directly, as `"<namespace>/<name>"`.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    /// Cluster the workload runs in (`k8s.cluster.name` baggage, `*_cluster` labels).
    #[serde(default)]
    pub cluster_id: String,
    /// Name of the controller owning the pod, e.g. the Deployment (`k8s.<type>.name`).
    #[serde(default)]
    pub workload_name: String,
    /// Kind of that controller, lower case: `deployment`, `pod`, `job`, `cronjob`.
    #[serde(default)]
    pub workload_type: String,
    /// Pod labels, for a waypoint's DestinationRule subsets (Istio's workload resource
    /// carries none: from xDS they are `app`/`version` from the canonical name and revision).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where the workload runs (Istio's `locality`): locality-aware load balancing prefers
    /// endpoints near the caller. Empty parts fall back to the topology labels.
    #[serde(default)]
    pub locality: Locality,
}

/// Region, zone and subzone of a workload, as Istio's workload resource carries them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub subzone: String,
}

impl Workload {
    /// What the policy engine needs to know about this workload as a destination.
    pub fn policy_target(&self) -> crate::policy::PolicyTarget<'_> {
        crate::policy::PolicyTarget {
            uid: &self.uid,
            namespace: &self.namespace,
            selected_by: &self.authorization_policies,
        }
    }

    /// The labels subsets select on: the workload's own, or `app` and `version` from its
    /// canonical name and revision when it has none.
    pub fn subset_labels(&self) -> BTreeMap<String, String> {
        if !self.labels.is_empty() {
            return self.labels.clone();
        }
        [("app", &self.canonical_name), ("version", &self.canonical_revision)]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    /// Region, zone and subzone: the workload's `locality`, each empty part taken from the
    /// topology labels Kubernetes and Istio set (`topology.kubernetes.io/region`, `.../zone`,
    /// `topology.istio.io/subzone`); empty when unknown.
    pub fn locality<'a>(&'a self) -> (&'a str, &'a str, &'a str) {
        let part = |own: &'a str, label: &str| -> &'a str {
            if own.is_empty() {
                self.labels.get(label).map(String::as_str).unwrap_or("")
            } else {
                own
            }
        };
        let l = &self.locality;
        (
            part(&l.region, "topology.kubernetes.io/region"),
            part(&l.zone, "topology.kubernetes.io/zone"),
            part(&l.subzone, "topology.istio.io/subzone"),
        )
    }
}

fn default_sa() -> String {
    "default".into()
}

/// A Kubernetes-style service: VIPs and ports in front of workloads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// `"<network>/<ip>"` or a bare IP.
    #[serde(default)]
    pub vips: Vec<String>,
    /// Service port → target port (0 = same port).
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
    /// Extra identities the service's endpoints may present.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// The waypoint (L7 proxy) that traffic to the service's VIPs must go through
    /// (`istio.io/use-waypoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
}

/// Where a waypoint is: an address (its pod's IP or its Service's VIP) or the
/// `namespace/hostname` of its Service, and the port it takes HBONE on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default = "default_hbone_port")]
    pub hbone_mtls_port: u16,
}

fn default_hbone_port() -> u16 {
    ztunnel_common::HBONE_PORT
}

impl Service {
    /// The VIP addresses, with the optional `network/` prefix stripped.
    pub fn vip_addrs(&self) -> Result<Vec<IpAddr>, String> {
        self.vips
            .iter()
            .map(|v| {
                let ip = v.rsplit('/').next().unwrap_or(v);
                ip.parse().map_err(|e| format!("vip {v:?}: {e}"))
            })
            .collect()
    }

    /// `"<namespace>/<hostname>"`, the key workloads use to join a service.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// The whole local config after validation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LocalConfig {
    /// Shared with the snapshot's indexes and the xDS client's resource table, so each
    /// workload is held once however many places refer to it.
    pub workloads: Vec<std::sync::Arc<Workload>>,
    pub services: Vec<std::sync::Arc<Service>>,
    pub policies: Vec<Authorization>,
    /// Policy entries that were rejected; each makes the workloads it could select deny everything.
    pub invalid_policies: Vec<InvalidPolicy>,
}

/// One rejected entry (or the whole document when it is not YAML at all).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind} {name}: {reason}")]
pub struct ConfigError {
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

/// The document's top level. Unknown keys are refused: a misspelt `policies:` must not quietly mean "no policies".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    workloads: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    services: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    policies: Vec<serde_yaml_ng::Value>,
}

fn entry_name(v: &serde_yaml_ng::Value, idx: usize) -> String {
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    match (field("namespace"), field("name").or_else(|| field("uid"))) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) => n,
        _ => format!("#{idx}"),
    }
}

fn parse_entries<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    raw: Vec<serde_yaml_ng::Value>,
    errors: &mut Vec<ConfigError>,
    validate: impl Fn(&T) -> Result<(), String>,
) -> Vec<T> {
    let mut out = Vec::new();
    for (i, v) in raw.into_iter().enumerate() {
        let name = entry_name(&v, i);
        match serde_yaml_ng::from_value::<T>(v).map_err(|e| e.to_string()).and_then(|t| validate(&t).map(|_| t)) {
            Ok(t) => out.push(t),
            Err(reason) => errors.push(ConfigError { kind, name, reason }),
        }
    }
    out
}

/// Parses a local config. Bad entries are returned as errors (by kind and name) and left
/// out; the good ones are kept. A document that is not valid YAML is one error.
pub fn parse_local_config(text: &str) -> (LocalConfig, Vec<ConfigError>) {
    let raw: RawConfig = match serde_yaml_ng::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            return (
                LocalConfig::default(),
                vec![ConfigError { kind: "document", name: "local config".into(), reason: e.to_string() }],
            )
        }
    };
    let mut errors = Vec::new();
    let workloads = parse_entries("workload", raw.workloads, &mut errors, |w: &Workload| {
        if w.uid.is_empty() {
            return Err("uid is empty".into());
        }
        if w.workload_ips.is_empty() {
            return Err("no workloadIps".into());
        }
        Ok(())
    });
    let services = parse_entries("service", raw.services, &mut errors, |s: &Service| {
        s.vip_addrs().map(|_| ())?;
        if s.hostname.is_empty() {
            return Err("hostname is empty".into());
        }
        if let Some(w) = &s.waypoint {
            if w.address.is_some() == w.hostname.is_some() {
                return Err("waypoint needs exactly one of address and hostname".into());
            }
        }
        Ok(())
    });
    let mut policies = Vec::new();
    let mut invalid_policies = Vec::new();
    for (i, v) in raw.policies.into_iter().enumerate() {
        match parse_policy(&v) {
            Ok(p) => policies.push(p),
            Err(bad) => {
                errors.push(ConfigError { kind: "policy", name: entry_name(&v, i), reason: bad.reason.clone() });
                invalid_policies.push(bad);
            }
        }
    }
    let workloads = workloads.into_iter().map(std::sync::Arc::new).collect();
    let services = services.into_iter().map(std::sync::Arc::new).collect();
    (LocalConfig { workloads, services, policies, invalid_policies }, errors)
}
