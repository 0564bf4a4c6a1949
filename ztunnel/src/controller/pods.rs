//! The pods the mesh knows: those written as `kind: Pod`, and those a `kind: Deployment` stands for. There is no
//! scheduler, so a Deployment's pods get their IPs and nodes from this project's annotations on the Deployment:
//!
//! - `mesh.local/pod-ips: "10.0.0.5,10.0.0.6"`: one IP per replica (as many as `spec.replicas`, default 1);
//! - `mesh.local/nodes: "node-a,node-b"`: one node per replica, or a single node for all of them (optional).
//!
//! A Deployment without `mesh.local/pod-ips` (as in Istio's samples) loads, but its pods have no IPs yet and so
//! are not workloads. Generated pods are named like Kubernetes names them (`<deployment>-<hash>-<suffix>`, here
//! derived from the Deployment's name so they are stable across reloads) and carry the template's labels plus
//! `pod-template-hash`.
//!
//! The workload name follows Istio's `GetWorkloadMetaFromPod`: the `service.istio.io/workload-name` label, else the
//! controlling owner (a ReplicaSet named `<deployment>-<pod-template-hash>` gives the Deployment's name), else a
//! Deployment in the namespace whose selector matches the pod, else the pod's name.
use std::net::IpAddr;

use super::objects::{Deployment, Pod, PodSpec, StringMap};

/// Annotation on a Deployment giving its pods' IPs.
pub const POD_IPS_ANNOTATION: &str = "mesh.local/pod-ips";
/// Annotation on a Deployment giving its pods' nodes.
pub const NODES_ANNOTATION: &str = "mesh.local/nodes";
/// Label that overrides the workload name.
const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";

/// A pod, written or generated, with what the model needs.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo {
    /// Generated from a Deployment.
    pub generated: bool,
    pub name: String,
    pub namespace: String,
    pub labels: StringMap,
    pub annotations: StringMap,
    pub spec: PodSpec,
    pub ips: Vec<IpAddr>,
    /// `Succeeded` or `Failed`: not a workload.
    pub terminal: bool,
    /// False only when a `Ready` condition says so (YAML pods without conditions are taken as ready).
    pub ready: bool,
    pub workload_name: String,
}

/// Reads a written Pod; `Err` is why it is rejected.
pub fn from_pod(pod: &Pod, namespace: &str, deployments: &[(&str, &Deployment)]) -> Result<PodInfo, String> {
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed: Vec<&str> = if pod.status.pod_ips.is_empty() {
        pod.status.pod_ip.iter().map(String::as_str).filter(|s| !s.is_empty()).collect()
    } else {
        pod.status.pod_ips.iter().map(|p| p.ip.as_str()).collect()
    };
    for ip in listed {
        let ip: IpAddr = ip.parse().map_err(|_| format!("status.podIPs: invalid IP {ip:?}"))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let meta = &pod.metadata;
    let phase = pod.status.phase.as_deref();
    let ready = pod.status.conditions.iter().find(|c| c.kind == "Ready").is_none_or(|c| c.status == "True");
    Ok(PodInfo {
        generated: false,
        name: meta.name.clone(),
        namespace: namespace.to_string(),
        labels: meta.labels.clone(),
        annotations: meta.annotations.clone(),
        spec: pod.spec.clone(),
        ips,
        terminal: matches!(phase, Some("Succeeded" | "Failed")),
        ready,
        workload_name: workload_name(pod, namespace, deployments),
    })
}

/// Istio's workload-name heuristic, plus the Deployment-selector fallback for hand-written pods.
fn workload_name(pod: &Pod, namespace: &str, deployments: &[(&str, &Deployment)]) -> String {
    let meta = &pod.metadata;
    if let Some(n) = meta.labels.get(WORKLOAD_NAME_LABEL) {
        return n.clone();
    }
    if let Some(owner) = meta.owner_references.iter().find(|o| o.controller == Some(true)) {
        if owner.kind == "ReplicaSet" {
            if let Some(hash) = meta.labels.get("pod-template-hash").filter(|h| !h.is_empty()) {
                if let Some(name) = owner.name.strip_suffix(hash.as_str()).and_then(|n| n.strip_suffix('-')) {
                    return name.to_string();
                }
            }
        }
        return owner.name.clone();
    }
    let selects = |d: &Deployment| {
        let sel = d.spec.selector.as_ref().map(|s| &s.match_labels).filter(|s| !s.is_empty());
        sel.is_some_and(|s| s.iter().all(|(k, v)| meta.labels.get(k) == Some(v)))
    };
    deployments
        .iter()
        .find(|(ns, d)| *ns == namespace && selects(d))
        .map(|(_, d)| d.metadata.name.clone())
        .unwrap_or_else(|| meta.name.clone())
}

/// The pods a Deployment stands for; empty when it gives no IPs. `Err` is why the Deployment is rejected.
pub fn from_deployment(d: &Deployment, namespace: &str) -> Result<Vec<PodInfo>, String> {
    let replicas = d.spec.replicas.unwrap_or(1) as usize;
    let template = &d.spec.template;
    if let Some(sel) = &d.spec.selector {
        if sel.match_labels.iter().any(|(k, v)| template.metadata.labels.get(k) != Some(v)) {
            return Err("spec.selector does not match spec.template.metadata.labels".into());
        }
    }
    let list = |key: &str| -> Vec<String> {
        d.metadata
            .annotations
            .get(key)
            .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    };
    let ips = list(POD_IPS_ANNOTATION);
    let nodes = list(NODES_ANNOTATION);
    if !d.metadata.annotations.contains_key(POD_IPS_ANNOTATION) {
        return Ok(Vec::new());
    }
    if ips.len() != replicas {
        return Err(format!(
            "annotation {POD_IPS_ANNOTATION} lists {} IPs for {replicas} replicas (one IP per replica)",
            ips.len()
        ));
    }
    if !(nodes.is_empty() || nodes.len() == 1 || nodes.len() == replicas) {
        return Err(format!(
            "annotation {NODES_ANNOTATION} lists {} nodes for {replicas} replicas (one node, or one per replica)",
            nodes.len()
        ));
    }
    let hash = template_hash(namespace, &d.metadata.name);
    let mut pods = Vec::with_capacity(replicas);
    for (i, ip) in ips.iter().enumerate() {
        let ip: IpAddr = ip.parse().map_err(|_| format!("annotation {POD_IPS_ANNOTATION}: invalid IP {ip:?}"))?;
        let mut labels = template.metadata.labels.clone();
        labels.insert("pod-template-hash".into(), hash.clone());
        let mut spec = template.spec.clone();
        if let Some(node) = nodes.get(i).or(nodes.first()) {
            spec.node_name = Some(node.clone());
        }
        let suffix = encode(fnv1a(format!("{namespace}/{}/{i}", d.metadata.name).as_bytes()), 5);
        pods.push(PodInfo {
            generated: true,
            name: format!("{}-{hash}-{suffix}", d.metadata.name),
            namespace: namespace.to_string(),
            workload_name: labels.get(WORKLOAD_NAME_LABEL).cloned().unwrap_or_else(|| d.metadata.name.clone()),
            labels,
            annotations: template.metadata.annotations.clone(),
            spec,
            ips: vec![ip],
            terminal: false,
            ready: true,
        });
    }
    Ok(pods)
}

/// A stable stand-in for Kubernetes' pod-template-hash (10 characters of its alphabet).
fn template_hash(namespace: &str, name: &str) -> String {
    encode(fnv1a(format!("{namespace}/{name}").as_bytes()), 10)
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Kubernetes' `SafeEncodeString` alphabet (no vowels, no confusable characters).
fn encode(mut n: u64, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..len)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// The port number a container of the pod exposes under `name`.
pub fn named_port(spec: &PodSpec, name: &str) -> Option<u16> {
    spec.containers.iter().flat_map(|c| &c.ports).find(|p| p.name.as_deref() == Some(name)).map(|p| p.container_port)
}
