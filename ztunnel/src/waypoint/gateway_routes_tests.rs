//! Tests of how the route table loads Gateway API objects and chooses between them and
//! VirtualServices: precedence, the state store's Services, last good versions, and what is
//! refused by name. The translation itself is tested in `routing::gateway_api`.
use std::sync::Arc;

use super::{Chosen, MeshServices};
use crate::routing::Request;
use crate::state::Service;
use crate::waypoint::routes::RouteTable;

fn docs(text: &str) -> Vec<serde_yaml_ng::Value> {
    serde_yaml_ng::Deserializer::from_str(text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
}

/// `reviews`, `reviews-v1` and `reviews-v2` in `default` (port 9080), and `tcp-echo` (9000),
/// as a waypoint's state store has them.
fn services() -> Arc<MeshServices> {
    let mut s = MeshServices::new();
    for name in ["reviews", "reviews-v1", "reviews-v2"] {
        s.insert(("default".into(), name.into()), vec![9080]);
    }
    s.insert(("default".into(), "tcp-echo".into()), vec![9000]);
    Arc::new(s)
}

fn service(name: &str) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        hostname: format!("{name}.default.svc.cluster.local"),
        vips: vec![],
        ports: Default::default(),
        subject_alt_names: vec![],
        waypoint: None,
    }
}

fn load(yaml: &str) -> RouteTable {
    RouteTable::load_with_services(&docs(yaml), &RouteTable::default(), services())
}

const WAYPOINT: (&str, &str) = ("default", "waypoint");

fn get(path: &str) -> Request<'_> {
    Request {
        method: "GET".into(),
        scheme: "http".into(),
        authority: "reviews:9080".into(),
        path: path.into(),
        headers: vec![],
        port: 9080,
    }
}

/// The backend Service a request to `reviews` is forwarded to.
fn backend(t: &RouteTable, path: &str) -> String {
    let route = t.mesh_route(&service("reviews"), 9080, Some("default"), WAYPOINT).expect("a route");
    match route.decide(&get(path), 0) {
        Some(crate::routing::Decision::Forward { destination, .. }) => destination.host,
        other => panic!("{other:?}"),
    }
}

fn http_route(name: &str, backend: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: reviews, port: 9080}}]\n  rules:\n  - backendRefs: [{{name: {backend}, port: 9080}}]\n---\n"
    )
}

const VS_TO_V2: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: default}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews-v2}\n---\n";

#[test]
fn an_httproute_on_the_service_takes_precedence_over_its_virtual_service() {
    let t = load(&format!("{VS_TO_V2}{}", http_route("reviews", "reviews-v1")));
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    assert_eq!(backend(&t, "/"), "reviews-v1.default.svc.cluster.local");
}

#[test]
fn without_a_route_on_the_service_its_virtual_service_still_routes() {
    let t = load(VS_TO_V2);
    assert!(matches!(t.mesh_route(&service("reviews"), 9080, None, WAYPOINT), Some(Chosen::VirtualService(_))));
    assert_eq!(backend(&t, "/"), "reviews-v2");
}

#[test]
fn routes_attach_to_the_services_of_the_state_store() {
    let yaml = http_route("reviews", "reviews-v1");
    let without = RouteTable::load_with_services(&docs(&yaml), &RouteTable::default(), Arc::default());
    assert!(without.mesh_route(&service("reviews"), 9080, None, WAYPOINT).is_none(), "no Service reviews known");
    let s = &without.gateway_api.routes.statuses[0];
    assert_eq!(s.conditions[0].reason, crate::routing::gateway_api::Reason::NoMatchingParent);
    let with = RouteTable::load_with_services(&docs(&yaml), &without, services());
    assert_eq!(backend(&with, "/"), "reviews-v1.default.svc.cluster.local");
}

#[test]
fn a_route_with_no_matching_rule_answers_404_without_falling_back() {
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: reviews}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /v1}}]\n    backendRefs: [{name: reviews-v1, port: 9080}]\n";
    let t = load(&format!("{VS_TO_V2}{route}"));
    let chosen = t.mesh_route(&service("reviews"), 9080, None, WAYPOINT).unwrap();
    match chosen.decide(&get("/other"), 0) {
        Some(crate::routing::Decision::Respond { status, rule, .. }) => {
            assert_eq!((status, rule), (404, crate::routing::gateway_api::NO_MATCH));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(chosen.route_name(crate::routing::gateway_api::NO_MATCH), "");
}

#[test]
fn a_rejected_httproute_keeps_its_previous_version_in_force() {
    let good = load(&http_route("reviews", "reviews-v1"));
    let broken = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews, namespace: default}\nspec:\n  parentRefs: 7\n";
    let t = RouteTable::load_with_services(&docs(broken), &good, services());
    let names: Vec<&str> = t.rejected.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["HTTPRoute default/reviews"], "{:?}", t.rejected);
    assert!(t.rejected[0].reason.contains("spec does not parse"), "{:?}", t.rejected);
    assert_eq!(backend(&t, "/"), "reviews-v1.default.svc.cluster.local", "the earlier version stays");
    let fixed = RouteTable::load_with_services(&docs(&http_route("reviews", "reviews-v2")), &t, services());
    assert_eq!(backend(&fixed, "/"), "reviews-v2.default.svc.cluster.local");
}

#[test]
fn declaring_the_waypoints_own_gateway_alone_leaves_the_virtual_service_in_force() {
    let gw = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: default}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n";
    let t = load(&format!("{gw}{VS_TO_V2}"));
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    assert_eq!(backend(&t, "/"), "reviews-v2");
}

#[test]
fn a_route_attached_to_the_waypoints_gateway_routes_every_service_it_serves() {
    let gw = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: default}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n";
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: all, namespace: default}\nspec:\n  parentRefs: [{name: waypoint}]\n  rules:\n  - backendRefs: [{name: reviews-v1, port: 9080}]\n";
    let t = load(&format!("{gw}{VS_TO_V2}{route}"));
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    assert_eq!(backend(&t, "/"), "reviews-v1.default.svc.cluster.local");
}

#[test]
fn a_tcproute_on_a_service_makes_its_tunnels_tcp_to_the_backend() {
    let route = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: echo, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: tcp-echo, port: 9000}]\n  rules:\n  - backendRefs: [{name: reviews-v1, port: 9080}]\n";
    let t = load(route);
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    let chosen = t.mesh_route(&service("tcp-echo"), 9000, None, WAYPOINT).expect("the TCPRoute");
    assert!(chosen.is_tcp(9000));
    let targets = chosen.tcp_targets(9000).unwrap();
    assert_eq!(targets[0].0.host, "reviews-v1.default.svc.cluster.local");
}

#[test]
fn istio_gateways_and_other_kinds_beside_gateway_api_objects_are_not_refused() {
    let istio = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: bookinfo, namespace: default}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 8080, name: http, protocol: HTTP}\n    hosts: ['*']\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: istio}\nspec: {controllerName: istio.io/gateway-controller}\n---\n";
    let t = load(&format!("{istio}{}", http_route("reviews", "reviews-v1")));
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
}

#[test]
fn a_tlsroute_is_refused_by_name_as_not_supported() {
    let route = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {name: secure, namespace: web}\nspec: {}\n";
    let t = load(route);
    assert_eq!(t.rejected.len(), 1);
    assert_eq!(t.rejected[0].name, "TLSRoute web/secure");
    assert_eq!(t.rejected[0].reason, "TLSRoute is not supported");
}

#[test]
fn the_admin_dump_lists_each_routes_conditions_per_parent() {
    let t = load(&http_route("reviews", "nowhere"));
    let dump = t.gateway_api.status_json();
    let s = &dump["routeStatus"][0];
    assert_eq!(s["route"], "HTTPRoute default/reviews");
    assert_eq!(s["parent"], "Service default/reviews:9080");
    let resolved = s["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "ResolvedRefs").unwrap();
    assert_eq!((resolved["status"].as_str(), resolved["reason"].as_str()), (Some("False"), Some("BackendNotFound")));
}
