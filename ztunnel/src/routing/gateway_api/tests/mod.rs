//! The Gateway API conformance cases (kubernetes-sigs/gateway-api `conformance/tests`) that
//! make sense without a cluster, as tables: the case's YAML in, requests in, the decision
//! the conformance suite expects out (backend, status, redirect location, forwarded path
//! and headers, route conditions). Each test is named after its conformance case. The
//! fixtures below stand for the suite's base manifests (`conformance/base/manifests.yaml`).
use std::collections::BTreeMap;

use super::*;
use crate::routing::spec::HeaderOperations;

mod filters;
mod matching;
mod status;

/// The suite's namespace for Gateways, routes and most backends.
const INFRA: &str = "gateway-conformance-infra";

/// The base manifests: namespaces, the shared Gateways and the backend Services.
const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: gateway-conformance-infra, labels: {gateway-conformance: infra}}
---
apiVersion: v1
kind: Namespace
metadata: {name: gateway-conformance-web-backend, labels: {gateway-conformance: backend}}
---
apiVersion: v1
kind: Namespace
metadata: {name: gateway-conformance-app-backend, labels: {gateway-conformance: backend}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: same-namespace, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: same-namespace-with-https-listener, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: istio
  listeners:
  - {name: https, port: 443, protocol: HTTPS, allowedRoutes: {namespaces: {from: Same}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: all-namespaces, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: backend-namespaces, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 80
    protocol: HTTP
    allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {gateway-conformance: backend}}}}
---
apiVersion: v1
kind: Service
metadata: {name: infra-backend-v1, namespace: gateway-conformance-infra}
spec: {ports: [{name: first-port, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: infra-backend-v2, namespace: gateway-conformance-infra}
spec: {ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: infra-backend-v3, namespace: gateway-conformance-infra}
spec: {ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: grpc-infra-backend-v1, namespace: gateway-conformance-infra}
spec: {ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: grpc-infra-backend-v2, namespace: gateway-conformance-infra}
spec: {ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-backend, namespace: gateway-conformance-web-backend}
spec: {ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: app-backend-v1, namespace: gateway-conformance-app-backend}
spec: {ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: app-backend-v2, namespace: gateway-conformance-app-backend}
spec: {ports: [{port: 8080}]}
"#;

fn yaml_docs(text: &str) -> Vec<serde_yaml_ng::Value> {
    serde_yaml_ng::Deserializer::from_str(text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
}

/// Loads the base manifests and a case's YAML; nothing may be rejected.
fn load_case(case: &str) -> GatewayRoutes {
    let g = load_case_allowing_rejects(case);
    assert!(g.rejected.is_empty(), "{:?}", g.rejected);
    g
}

fn load_case_allowing_rejects(case: &str) -> GatewayRoutes {
    let docs = yaml_docs(&format!("{BASE}\n---\n{case}"));
    load(&docs, &Cluster::from_docs(&docs))
}

/// A request as the suite sends it (header names any case).
fn req(method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> Request<'static> {
    Request {
        method: method.to_string().into(),
        scheme: "http".into(),
        authority: host.to_string().into(),
        path: path.to_string().into(),
        headers: headers.iter().map(|(k, v)| (k.to_ascii_lowercase().into(), v.to_string().into())).collect(),
        port: 80,
    }
}

fn get(host: &str, path: &str) -> Request<'static> {
    req("GET", host, path, &[])
}

/// What the client sees, in short: the backend Service's name, a status, or
/// `<code> <location>`.
fn answer(p: &ParentRoutes, q: &Request) -> String {
    match p.decide(q, 0) {
        Decision::Forward { destination, .. } => destination.host.split('.').next().unwrap_or_default().to_string(),
        Decision::Respond { status, .. } => status.to_string(),
        Decision::Redirect { code, location, .. } => format!("{code} {location}"),
    }
}

/// [`answer`] for a request to a Gateway of the infra namespace on `port` (404 when no
/// listener takes it).
fn at(g: &GatewayRoutes, gateway: &str, port: u16, q: &Request) -> String {
    let mut q = q.clone();
    q.port = port;
    match g.for_gateway(INFRA, gateway, port, &q.authority) {
        Some(p) => answer(p, &q),
        None => "404".into(),
    }
}

/// Runs a table against one Gateway port: each request and the answer expected.
fn check(g: &GatewayRoutes, gateway: &str, port: u16, cases: &[(Request, &str)]) {
    for (q, want) in cases {
        assert_eq!(at(g, gateway, port, q), *want, "{} {}{} {:?}", q.method, q.authority, q.path, q.headers);
    }
}

/// The request as forwarded: backend, path, authority and headers (lower-case names) after
/// the rule's and the chosen backend's header changes.
#[derive(Debug, PartialEq)]
struct Forwarded {
    backend: String,
    path: String,
    authority: String,
    headers: BTreeMap<String, String>,
}

fn forwarded(g: &GatewayRoutes, gateway: &str, q: &Request) -> Forwarded {
    let p = g.for_gateway(INFRA, gateway, 80, &q.authority).expect("a listener");
    match p.decide(q, 0) {
        Decision::Forward { rule, destination, path, authority, headers } => {
            let mut h: Vec<(String, String)> = q.headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let rule_ops = p.router.rule(rule).and_then(|r| r.headers.clone()).and_then(|h| h.request);
            for ops in [rule_ops, headers.and_then(|h| h.request)].iter().flatten() {
                apply(ops, &mut h);
            }
            let backend = destination.host.split('.').next().unwrap_or_default().to_string();
            Forwarded { backend, path, authority, headers: h.into_iter().collect() }
        }
        other => panic!("{other:?}"),
    }
}

/// The response headers the client gets when the backend answers with `from_backend`.
fn response_headers(g: &GatewayRoutes, q: &Request, from_backend: &[(&str, &str)]) -> BTreeMap<String, String> {
    let p = g.for_gateway(INFRA, "same-namespace", 80, &q.authority).expect("a listener");
    let d = p.decide(q, 0);
    let mut h: Vec<(String, String)> =
        from_backend.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect();
    if let Some(ops) = p.router.rule(d.rule()).and_then(|r| r.headers.clone()).and_then(|h| h.response) {
        apply(&ops, &mut h);
    }
    h.into_iter().collect()
}

/// Header operations as a proxy applies them: `set` replaces, `add` appends with a comma,
/// `remove` deletes, names case-insensitively.
fn apply(ops: &HeaderOperations, h: &mut Vec<(String, String)>) {
    for (k, v) in &ops.set {
        h.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
        h.push((k.to_ascii_lowercase(), v.clone()));
    }
    for (k, v) in &ops.add {
        match h.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(k)) {
            Some((_, old)) => *old = format!("{old},{v}"),
            None => h.push((k.to_ascii_lowercase(), v.clone())),
        }
    }
    for k in &ops.remove {
        h.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
    }
}

fn headers(list: &[(&str, &str)]) -> BTreeMap<String, String> {
    list.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect()
}

/// A condition of route `kind ns/name` on its first parentRef: status and reason.
fn condition(g: &GatewayRoutes, kind: RouteKind, ns: &str, name: &str, c: ConditionType) -> (bool, Reason) {
    let s = g.status_of(kind, ns, name).next().unwrap_or_else(|| panic!("no status for {name}"));
    let c = s.condition(c).unwrap_or_else(|| panic!("no {c:?} for {name}: {s:?}"));
    (c.status, c.reason)
}
