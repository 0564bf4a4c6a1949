//! The Gateway API objects as users write them (`gateway.networking.k8s.io`): the `spec` of
//! HTTPRoute (v1, v1beta1), GRPCRoute (v1, v1alpha2), TCPRoute (v1alpha2, v1), Gateway (v1,
//! v1beta1) and ReferenceGrant (v1, v1beta1, v1alpha2), plus the little of a core Service the
//! checks need. These exist so route translation reads typed fields instead of raw YAML; the
//! versions listed share one shape for every field we read. Unknown fields are ignored, as a
//! newer API version's objects may carry them; enum-like fields stay strings so an unknown
//! value becomes a route condition (`UnsupportedValue`), not a parse failure.
use std::collections::BTreeMap;

use serde::Deserialize;

/// The API group every route, Gateway and ReferenceGrant belongs to.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// A reference from a route to the object it attaches to: a Gateway (optionally one listener,
/// by `sectionName` or `port`) or, for a mesh (GAMMA), a Service (optionally one port).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    /// `None`: `gateway.networking.k8s.io`; `""`: the core group (Services).
    pub group: Option<String>,
    /// `None`: `Gateway`.
    pub kind: Option<String>,
    /// `None`: the route's own namespace.
    pub namespace: Option<String>,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u32>,
}

/// A reference to a backend (kind Service in the core group unless told otherwise).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackendObjectReference {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u32>,
}

/// A weighted backend of an HTTPRoute, GRPCRoute or TCPRoute rule, with filters that apply
/// only when it is chosen (TCPRoute backends have none).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(flatten)]
    pub target: BackendObjectReference,
    /// `None`: 1. Relative to the rule's other backends; 0 sends nothing.
    pub weight: Option<i64>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
}

/// `spec` of an HTTPRoute.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// The API server defaults an absent list to one rule matching every request.
    pub rules: Option<Vec<HttpRouteRule>>,
}

/// One HTTPRoute rule: matches (any of them), filters, backends.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: Option<HttpRouteTimeouts>,
}

/// Conditions that must all hold (a missing `path` is `PathPrefix /`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    pub path: Option<HttpPathMatch>,
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    #[serde(default)]
    pub query_params: Vec<HttpHeaderMatch>,
    pub method: Option<String>,
}

/// `Exact`, `PathPrefix` (the default, whole path segments) or `RegularExpression`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpPathMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

/// A header (or query parameter) condition: `Exact` (default) or `RegularExpression`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpHeaderMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

/// One filter: `type` names which of the other fields applies.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    pub request_header_modifier: Option<HttpHeaderFilter>,
    pub response_header_modifier: Option<HttpHeaderFilter>,
    pub request_mirror: Option<HttpRequestMirrorFilter>,
    pub request_redirect: Option<HttpRequestRedirectFilter>,
    pub url_rewrite: Option<HttpUrlRewriteFilter>,
    pub extension_ref: Option<LocalObjectReference>,
}

/// `set` replaces, `add` appends, `remove` deletes; names are case-insensitive.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpHeaderFilter {
    #[serde(default)]
    pub set: Vec<HttpHeader>,
    #[serde(default)]
    pub add: Vec<HttpHeader>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

/// `ReplaceFullPath` or `ReplacePrefixMatch` (of a `PathPrefix` match).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpPathModifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

/// A redirect answered by the proxy (302 unless `statusCode` says otherwise).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRequestRedirectFilter {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<HttpPathModifier>,
    pub port: Option<u32>,
    pub status_code: Option<u32>,
}

/// Host and path rewritten before forwarding.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpUrlRewriteFilter {
    pub hostname: Option<String>,
    pub path: Option<HttpPathModifier>,
}

/// A copy of the request sent to `backendRef` (all requests, or `percent` / `fraction`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRequestMirrorFilter {
    pub backend_ref: BackendObjectReference,
    pub percent: Option<i64>,
    pub fraction: Option<Fraction>,
}

/// `numerator / denominator` (denominator 100 unless given).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct Fraction {
    pub numerator: i64,
    pub denominator: Option<i64>,
}

/// An implementation-specific filter object.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LocalObjectReference {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
}

/// GEP-2257 durations (`10s`, `1h30m`, `500ms`); `0s` turns the timeout off.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

/// `spec` of a GRPCRoute.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// One GRPCRoute rule (its filters are a subset of HTTPRoute's, in the same shape).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// A gRPC method condition and header conditions (all must hold).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GrpcRouteMatch {
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
}

/// `service` and/or `method`, `Exact` (default) or `RegularExpression`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GrpcMethodMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub service: Option<String>,
    pub method: Option<String>,
}

/// `spec` of a TCPRoute.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub rules: Vec<TcpRouteRule>,
}

/// A TCPRoute rule: weighted backends.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRouteRule {
    pub name: Option<String>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// `spec` of a Gateway: its class (`istio` for ingress, `istio-waypoint` for waypoints) and
/// listeners.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
}

/// Where a Gateway accepts traffic, and which routes may attach there.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    pub hostname: Option<String>,
    pub port: u32,
    pub protocol: String,
    pub allowed_routes: Option<AllowedRoutes>,
    /// For `HTTPS` and `TLS` listeners: how TLS is handled and with which certificates.
    pub tls: Option<GatewayTlsConfig>,
}

/// A listener's `tls`: `Terminate` (the default) with the certificates of `certificateRefs`,
/// or `Passthrough`. Read so an ingress can terminate HTTPS with the Secret it names.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayTlsConfig {
    pub mode: Option<String>,
    #[serde(default)]
    pub certificate_refs: Vec<SecretObjectReference>,
}

/// A reference to a certificate: a core `Secret` unless `group` / `kind` say otherwise;
/// `namespace` defaults to the Gateway's.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct SecretObjectReference {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
}

/// The namespaces (default: the Gateway's own) and kinds (default: by protocol) of routes
/// a listener takes.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct AllowedRoutes {
    pub namespaces: Option<RouteNamespaces>,
    #[serde(default)]
    pub kinds: Vec<RouteGroupKind>,
}

/// `from: Same | All | Selector` (with `selector`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct RouteNamespaces {
    pub from: Option<String>,
    pub selector: Option<LabelSelector>,
}

/// A route kind (group defaults to `gateway.networking.k8s.io`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct RouteGroupKind {
    pub group: Option<String>,
    pub kind: String,
}

/// A Kubernetes label selector: `matchLabels` and `matchExpressions`, all must hold.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// `key` `In` / `NotIn` / `Exists` / `DoesNotExist` `values`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

impl LabelSelector {
    /// Whether `labels` satisfy every condition (an empty selector selects everything).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let v = labels.get(&e.key);
                match e.operator.as_str() {
                    "In" => v.is_some_and(|v| e.values.contains(v)),
                    "NotIn" => v.is_none_or(|v| !e.values.contains(v)),
                    "Exists" => v.is_some(),
                    "DoesNotExist" => v.is_none(),
                    _ => false,
                }
            })
    }
}

/// `spec` of a ReferenceGrant: routes of `from` may reference objects of `to` in the
/// grant's namespace.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ReferenceGrantSpec {
    #[serde(default)]
    pub from: Vec<ReferenceGrantFrom>,
    #[serde(default)]
    pub to: Vec<ReferenceGrantTo>,
}

/// Who may reference: a kind in a namespace.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ReferenceGrantFrom {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

/// What may be referenced: a kind, optionally one name.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ReferenceGrantTo {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: Option<String>,
}

/// The part of a core Service's `spec` route checks need: its ports.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ServiceSpec {
    #[serde(default)]
    pub ports: Vec<ServicePortSpec>,
}

/// A Service port (its name is what a parentRef's `sectionName` names).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ServicePortSpec {
    pub name: Option<String>,
    pub port: u32,
}
