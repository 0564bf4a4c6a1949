//! The Kubernetes and Istio objects the controller reads, as typed serde structs holding only the fields the
//! translation uses. Real manifests carry far more (images, probes, resources, status); unknown fields are ignored
//! so any `kubectl`-ready file loads. Kinds that another part of the project interprets (routing:
//! VirtualService, DestinationRule, Gateway, HTTPRoute) are kept as raw YAML values with their metadata.
//!
//! [`parse_object`] turns one YAML value (one document, or one `items` entry of a `List`) into an [`Object`], or
//! says why it cannot.
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer};
use serde_yaml_ng::Value;

/// Labels or annotations. Kubernetes only allows string values; anything else rejects the object.
pub type StringMap = BTreeMap<String, String>;

/// The parts of `metadata` the translation reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    /// Absent means `default` for namespaced kinds (as with `kubectl apply`).
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub labels: StringMap,
    #[serde(default, deserialize_with = "null_default")]
    pub annotations: StringMap,
    #[serde(default, deserialize_with = "null_default")]
    pub owner_references: Vec<OwnerReference>,
    /// RFC 3339; decides which of several PeerAuthentications wins (the oldest), as in Istio.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

/// Who created a pod: gives the workload name (Istio's `GetDeployMetaFromPod`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub controller: Option<bool>,
}

/// `matchLabels` of a label selector (`matchExpressions` is not read).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, deserialize_with = "null_default")]
    pub match_labels: StringMap,
}

/// `kind: Namespace`: its labels opt pods into ambient and pick waypoints.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Namespace {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

/// `kind: Node`: only its topology labels are read, for the locality of the pods on it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Node {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

/// `kind: Pod`: one workload once it has an IP.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

/// The parts of a pod spec (also a Deployment's template) that matter to the mesh.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// Empty means `default`.
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub host_network: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub containers: Vec<Container>,
}

/// A container: only its named ports, which resolve Services' named `targetPort`s.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<ContainerPort>,
}

/// `containers[].ports[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: u16,
}

/// Pod status as written in the YAML (there is no scheduler or kubelet to fill it in).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs", deserialize_with = "null_default")]
    pub pod_ips: Vec<PodIp>,
    /// `Succeeded` / `Failed` pods are terminal and are not workloads.
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub conditions: Vec<PodCondition>,
}

/// `status.podIPs[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

/// `status.conditions[]`: only `Ready` is read.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
}

/// `kind: Deployment`: expands into pods when it says which IPs they have (see the controller docs).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Deployment {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DeploymentSpec,
}

/// `spec` of a Deployment.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct DeploymentSpec {
    /// Kubernetes' default is 1.
    #[serde(default)]
    pub replicas: Option<u32>,
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    #[serde(default)]
    pub template: PodTemplate,
}

/// A pod template: the generated pods' labels, annotations and spec.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PodTemplate {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
}

/// `kind: Service`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Service {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

/// `spec` of a Service.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP` (default), `NodePort`, `LoadBalancer` or `ExternalName` (not sent, as in Istio).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Absent or empty selects no pods (Kubernetes: endpoints are managed by hand).
    #[serde(default, deserialize_with = "null_default")]
    pub selector: StringMap,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs", deserialize_with = "null_default")]
    pub cluster_ips: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub ip_families: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub internal_traffic_policy: Option<String>,
    #[serde(default)]
    pub traffic_distribution: Option<String>,
    #[serde(default)]
    pub publish_not_ready_addresses: bool,
}

/// `spec.ports[]` of a Service.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    /// A number or the name of a container port; absent means the same as `port`.
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    /// `TCP` (default), `UDP`, `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// Kubernetes' `IntOrString` (`targetPort`, PeerAuthentication port keys).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrString::Int(n) => write!(f, "{n}"),
            IntOrString::String(s) => f.write_str(s),
        }
    }
}

/// `kind: ServiceAccount`: known so that status can list it; identities come from pods' `serviceAccountName`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ServiceAccount {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

/// `security.istio.io` `AuthorizationPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

/// `spec` of an AuthorizationPolicy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Absent: the whole namespace (or the mesh, in the root namespace).
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// Set: the policy is for a waypoint, not for ztunnel.
    #[serde(default)]
    pub target_ref: Option<Value>,
    #[serde(default, deserialize_with = "null_default")]
    pub target_refs: Vec<Value>,
    /// `ALLOW` (default), `DENY`, `AUDIT`, `CUSTOM`.
    #[serde(default)]
    pub action: Option<String>,
    /// Absent: an ALLOW allows nothing, a DENY denies nothing.
    #[serde(default)]
    pub rules: Option<Vec<AuthorizationRule>>,
    #[serde(default)]
    pub provider: Option<Value>,
}

/// One rule: all of `from`, `to` and `when` must hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRule {
    #[serde(default, deserialize_with = "null_default")]
    pub from: Vec<RuleFrom>,
    #[serde(default, deserialize_with = "null_default")]
    pub to: Vec<RuleTo>,
    #[serde(default, deserialize_with = "null_default")]
    pub when: Vec<Condition>,
}

/// `from[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Source,
}

/// `from[].source`. The `request*` and `remoteIpBlocks` fields are HTTP-level (L7).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, deserialize_with = "strings")]
    pub principals: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub not_principals: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub request_principals: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub not_request_principals: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub namespaces: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub not_namespaces: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub not_service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub not_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// `to[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Operation,
}

/// `to[].operation`. Only the ports are L4; hosts, methods and paths are HTTP-level.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default, deserialize_with = "strings")]
    pub hosts: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub not_hosts: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub ports: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub not_ports: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub methods: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub not_methods: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub paths: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub not_paths: Vec<String>,
}

/// `when[]`: `key` with `values` / `notValues`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default, deserialize_with = "strings")]
    pub values: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub not_values: Vec<String>,
}

/// `security.istio.io` `PeerAuthentication`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PeerAuthentication {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

/// `spec` of a PeerAuthentication.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Keyed by port number (YAML keys may be numbers or strings).
    #[serde(default, deserialize_with = "null_default")]
    pub port_level_mtls: BTreeMap<IntOrStringKey, MutualTls>,
}

/// A map key that may be written `9080:` or `"9080":`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(untagged)]
pub enum IntOrStringKey {
    Int(i64),
    String(String),
}

/// `mtls` / `portLevelMtls[port]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MutualTls {
    /// `UNSET` (default), `DISABLE`, `PERMISSIVE`, `STRICT`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// `networking.istio.io` `ServiceEntry`: hosts, VIPs and ports of a service outside Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ServiceEntry {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceEntrySpec,
}

/// `spec` of a ServiceEntry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default, deserialize_with = "strings")]
    pub hosts: Vec<String>,
    #[serde(default, deserialize_with = "strings")]
    pub addresses: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<ServiceEntryPort>,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub resolution: Option<String>,
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
}

/// `spec.ports[]` of a ServiceEntry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryPort {
    pub number: u16,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub target_port: Option<u16>,
}

/// `spec.workloadSelector` of a ServiceEntry (plain `labels`, not `matchLabels`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct WorkloadSelector {
    #[serde(default, deserialize_with = "null_default")]
    pub labels: StringMap,
}

/// An object carried without interpretation (routing kinds): identity plus `spec` and `status` as YAML.
#[derive(Debug, Clone, PartialEq)]
pub struct RawObject {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: Value,
    pub status: Value,
}

/// One object read from a file.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Node(Node),
    Pod(Pod),
    Service(Service),
    ServiceAccount(ServiceAccount),
    Deployment(Deployment),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
    ServiceEntry(ServiceEntry),
    /// VirtualService, DestinationRule, Gateway (both APIs), HTTPRoute, GRPCRoute, TCPRoute, ReferenceGrant.
    Raw(RawObject),
}

impl Object {
    /// The object's `kind`.
    pub fn kind(&self) -> &str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Node(_) => "Node",
            Object::Pod(_) => "Pod",
            Object::Service(_) => "Service",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::Deployment(_) => "Deployment",
            Object::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Object::PeerAuthentication(_) => "PeerAuthentication",
            Object::ServiceEntry(_) => "ServiceEntry",
            Object::Raw(r) => &r.kind,
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::Deployment(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::PeerAuthentication(o) => &o.metadata,
            Object::ServiceEntry(o) => &o.metadata,
            Object::Raw(o) => &o.metadata,
        }
    }

    /// The namespace the object lives in (`default` when unset); empty for the cluster-scoped Namespace and Node.
    pub fn namespace(&self) -> &str {
        match self {
            Object::Namespace(_) | Object::Node(_) => "",
            o => o.metadata().namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
        }
    }
}

/// Where objects without `metadata.namespace` live, as with `kubectl apply`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// What the model keys an object by: `kind` plus `namespace/name` (just `name` for a Namespace).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    /// The reference of a parsed object.
    pub fn of(o: &Object) -> Self {
        ObjectRef { kind: o.kind().to_string(), namespace: o.namespace().to_string(), name: o.metadata().name.clone() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Why a document could not become an [`Object`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// A kind the controller does not read (ConfigMap, Secret, ...): skipped, not an error in the config.
    Unsupported { kind: String, api_version: String },
    /// A kind we read, but the object is malformed; `reason` says how.
    Invalid(String),
}

/// Which `apiVersion` groups each kind may come from, so a same-named kind of another API is not misread.
fn group_accepted(kind: &str, group: &str) -> bool {
    match kind {
        "Namespace" | "Node" | "Pod" | "Service" | "ServiceAccount" => group.is_empty(),
        "Deployment" => group == "apps",
        "AuthorizationPolicy" | "PeerAuthentication" => group == "security.istio.io",
        "ServiceEntry" | "VirtualService" | "DestinationRule" => group == "networking.istio.io",
        "Gateway" => group == "networking.istio.io" || group == "gateway.networking.k8s.io",
        "HTTPRoute" | "GRPCRoute" | "TCPRoute" | "ReferenceGrant" => group == "gateway.networking.k8s.io",
        _ => false,
    }
}

/// The API group of an `apiVersion` (`v1` → "", `apps/v1` → "apps").
pub fn api_group(api_version: &str) -> &str {
    api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("")
}

/// Reads one object (a document, or one item of a `List`; `List`s are expanded by the caller).
pub fn parse_object(v: Value) -> Result<Object, ParseError> {
    let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let (kind, api_version) = (text("kind"), text("apiVersion"));
    if kind.is_empty() {
        return Err(ParseError::Invalid("missing `kind`".into()));
    }
    if api_version.is_empty() {
        return Err(ParseError::Invalid("missing `apiVersion`".into()));
    }
    if !group_accepted(&kind, api_group(&api_version)) {
        return Err(ParseError::Unsupported { kind, api_version });
    }
    let typed = |e: serde_yaml_ng::Error| ParseError::Invalid(e.to_string());
    let object = match kind.as_str() {
        "Namespace" => Object::Namespace(serde_yaml_ng::from_value(v).map_err(typed)?),
        "Node" => Object::Node(serde_yaml_ng::from_value(v).map_err(typed)?),
        "Pod" => Object::Pod(serde_yaml_ng::from_value(v).map_err(typed)?),
        "Service" => Object::Service(serde_yaml_ng::from_value(v).map_err(typed)?),
        "ServiceAccount" => Object::ServiceAccount(serde_yaml_ng::from_value(v).map_err(typed)?),
        "Deployment" => Object::Deployment(serde_yaml_ng::from_value(v).map_err(typed)?),
        "AuthorizationPolicy" => Object::AuthorizationPolicy(serde_yaml_ng::from_value(v).map_err(typed)?),
        "PeerAuthentication" => Object::PeerAuthentication(serde_yaml_ng::from_value(v).map_err(typed)?),
        "ServiceEntry" => Object::ServiceEntry(serde_yaml_ng::from_value(v).map_err(typed)?),
        _ => {
            let metadata = v.get("metadata").cloned().unwrap_or(Value::Null);
            let metadata: ObjectMeta = if metadata.is_null() {
                ObjectMeta::default()
            } else {
                serde_yaml_ng::from_value(metadata).map_err(|e| ParseError::Invalid(format!("metadata: {e}")))?
            };
            let field = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
            Object::Raw(RawObject { api_version, kind, metadata, spec: field("spec"), status: field("status") })
        }
    };
    let meta = object.metadata();
    if meta.name.is_empty() {
        return Err(ParseError::Invalid("missing `metadata.name`".into()));
    }
    if !valid_name(&meta.name) {
        return Err(ParseError::Invalid(format!(
            "invalid metadata.name {:?} (lowercase DNS name expected)",
            meta.name
        )));
    }
    if let Some(ns) = &meta.namespace {
        if !valid_name(ns) {
            return Err(ParseError::Invalid(format!(
                "invalid metadata.namespace {ns:?} (lowercase DNS label expected)"
            )));
        }
    }
    Ok(object)
}

/// A Kubernetes object name: lowercase alphanumerics, `-` and `.`, starting and ending alphanumeric, ≤ 253.
fn valid_name(s: &str) -> bool {
    let ok_end = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    s.len() <= 253
        && ok_end(s.chars().next())
        && ok_end(s.chars().last())
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// `field: null` (or `field:` with nothing) is the same as leaving the field out, as in Kubernetes.
fn null_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A list of strings where numbers are also accepted (`ports: [9080]` as well as `ports: ["9080"]`).
fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let items: Option<Vec<Value>> = Option::deserialize(d)?;
    items
        .unwrap_or_default()
        .into_iter()
        .map(|v| match v {
            Value::String(s) => Ok(s),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(serde::de::Error::custom(format!("expected a string, found {}", describe(&other)))),
        })
        .collect()
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}
