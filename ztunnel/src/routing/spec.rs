//! The VirtualService spec as users write it (Istio's field names; `networking.istio.io`
//! v1, v1beta1 and v1alpha3 share it). Unknown fields are kept out of the way, not refused:
//! Istio accepts objects from newer API versions the same way.
use std::collections::BTreeMap;

use serde::Deserialize;

/// `spec` of a VirtualService.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualService {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// TLS routed by SNI without terminating it (an ingress Gateway's `PASSTHROUGH` servers).
    #[serde(default)]
    pub tls: Vec<TlsRoute>,
}

/// One HTTP rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(rename = "match", default)]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    pub direct_response: Option<DirectResponse>,
    pub timeout: Option<String>,
    pub retries: Option<Retries>,
    pub fault: Option<Fault>,
    pub mirror: Option<Destination>,
    pub mirror_percentage: Option<Percent>,
    #[serde(default)]
    pub mirrors: Vec<Mirror>,
    pub headers: Option<Headers>,
    pub cors_policy: Option<CorsPolicy>,
}

/// Header changes on the request (before forwarding) and on the response.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

/// `set` replaces, `add` appends, `remove` deletes (names are case-insensitive).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Cross-origin resource sharing, answered by the waypoint.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CorsPolicy {
    #[serde(default)]
    pub allow_origins: Vec<StringMatch>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    pub max_age: Option<String>,
    pub allow_credentials: Option<bool>,
}

/// One match block: every condition set must hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub ignore_uri_case: bool,
    pub port: Option<u32>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
}

/// `exact`, `prefix` or `regex` (RE2, whole-string); none set means "present".
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

/// A weighted destination.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteDestination {
    pub destination: Destination,
    #[serde(default)]
    pub weight: i64,
    pub headers: Option<Headers>,
}

/// A service (short name or FQDN), an optional DestinationRule subset and port.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

/// `port: {number: N}`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct PortSelector {
    pub number: u32,
}

/// An HTTP redirect answered by the waypoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u32>,
    pub scheme: Option<String>,
    pub redirect_code: Option<u32>,
}

/// Rewrites applied before forwarding.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// `uriRegexRewrite: {match, rewrite}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: String,
    pub rewrite: String,
}

/// A response the waypoint sends itself.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DirectResponse {
    pub status: u32,
    pub body: Option<DirectBody>,
}

/// `body: {string: ...}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DirectBody {
    pub string: Option<String>,
}

/// Retry policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    #[serde(default)]
    pub attempts: i64,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
}

/// Fault injection.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Fault {
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
}

/// An injected delay.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delay {
    pub fixed_delay: Option<String>,
    pub percentage: Option<Percent>,
}

/// An injected abort.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Abort {
    pub http_status: Option<i64>,
    pub grpc_status: Option<String>,
    pub percentage: Option<Percent>,
}

/// `{value: 0..100}`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
pub struct Percent {
    pub value: f64,
}

/// One of `mirrors`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Mirror {
    pub destination: Destination,
    pub percentage: Option<Percent>,
}

/// A TCP rule.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TcpRoute {
    #[serde(rename = "match", default)]
    pub matches: Vec<TcpMatch>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// A TCP match block.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpMatch {
    pub port: Option<u32>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
}

/// A rule for TLS passed through by SNI.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsRoute {
    #[serde(rename = "match", default)]
    pub matches: Vec<TlsMatch>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// A TLS match block: SNI names (exact or `*.suffix`) and an optional port.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsMatch {
    #[serde(default)]
    pub sni_hosts: Vec<String>,
    pub port: Option<u32>,
    #[serde(default)]
    pub gateways: Vec<String>,
}
