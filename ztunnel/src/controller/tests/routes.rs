//! Gateway API route conditions in the controller's status: each route is attached to the
//! model's Services and Gateways and listed per parentRef with `Accepted` and `ResolvedRefs`,
//! and a condition that is not as it should be shows on the route's status line.
use super::*;
use crate::controller::RouteConditions;
use crate::routing::gateway_api::{ConditionType, Reason};

const REVIEWS: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\nspec:\n  clusterIP: 10.96.0.30\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: reviews-v1, namespace: default}\nspec:\n  clusterIP: 10.96.0.31\n  selector: {app: reviews, version: v1}\n  ports: [{port: 9080}]\n";

fn route(name: &str, backend: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: reviews, port: 9080}}]\n  rules:\n  - backendRefs: [{{name: {backend}, port: 9080}}]\n"
    )
}

/// The conditions listed for route `name`.
fn conditions<'m>(m: &'m Model, name: &str) -> &'m RouteConditions {
    m.route_conditions()
        .iter()
        .find(|c| c.route.name == name)
        .unwrap_or_else(|| panic!("no conditions for {name}: {:#?}", m.route_conditions()))
}

#[test]
fn a_route_to_a_backend_that_does_not_exist_is_resolved_refs_false_backend_not_found() {
    let m = build(&format!("{REVIEWS}{}", route("to-nowhere", "nope")));
    let c = conditions(&m, "to-nowhere");
    assert_eq!(c.parent, "Service default/reviews:9080");
    let resolved = c.conditions.iter().find(|c| c.kind == ConditionType::ResolvedRefs).unwrap();
    assert_eq!((resolved.status, resolved.reason), (false, Reason::BackendNotFound));
    let accepted = c.conditions.iter().find(|c| c.kind == ConditionType::Accepted).unwrap();
    assert_eq!((accepted.status, accepted.reason), (true, Reason::Accepted));
    assert!(
        c.to_string().ends_with(
            "HTTPRoute default/to-nowhere: parent Service default/reviews:9080: Accepted=True (Accepted), \
             ResolvedRefs=False (BackendNotFound: backendRef default/nope: Service not found)"
        ),
        "{c}"
    );
    match outcome(&m, "HTTPRoute", "default", "to-nowhere") {
        Outcome::Warning(w) => assert!(w.contains("ResolvedRefs=False (BackendNotFound"), "{w}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_route_whose_parent_and_backends_exist_is_accepted_and_its_status_line_ok() {
    let m = build(&format!("{REVIEWS}{}", route("to-v1", "reviews-v1")));
    assert_no_errors(&m);
    let c = conditions(&m, "to-v1");
    assert!(c.conditions.iter().all(|c| c.status), "{c}");
    assert_eq!(outcome(&m, "HTTPRoute", "default", "to-v1"), Outcome::Ok);
}

#[test]
fn a_route_for_a_service_the_model_does_not_have_is_not_accepted() {
    let m = build(&route("orphan", "reviews-v1"));
    let c = conditions(&m, "orphan");
    let accepted = c.conditions.iter().find(|c| c.kind == ConditionType::Accepted).unwrap();
    assert_eq!((accepted.status, accepted.reason), (false, Reason::NoMatchingParent));
    assert!(
        matches!(outcome(&m, "HTTPRoute", "default", "orphan"), Outcome::Warning(w) if w.contains("NoMatchingParent"))
    );
}

#[test]
fn a_route_the_api_server_would_refuse_is_an_error_and_not_carried() {
    let bad = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: bad, namespace: default}\nspec:\n  parentRefs: 7\n";
    let m = build(&format!("{REVIEWS}{bad}"));
    assert!(
        matches!(outcome(&m, "HTTPRoute", "default", "bad"), Outcome::Error(e) if e.contains("spec does not parse"))
    );
    assert!(m.routing.iter().all(|r| r.object.metadata.name != "bad"));
}

#[test]
fn grpc_and_tcp_routes_and_reference_grants_are_read() {
    let yaml = format!(
        "{REVIEWS}---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {{name: raw, namespace: default}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: reviews}}]\n  rules:\n  - backendRefs: [{{name: reviews-v1, port: 9080}}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: rpc, namespace: default}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: reviews}}]\n  rules:\n  - backendRefs: [{{name: missing, port: 9080}}]\n---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g, namespace: default}}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: web}}]\n  to: [{{group: \"\", kind: Service}}]\n"
    );
    let m = build(&yaml);
    assert_no_errors(&m);
    assert_eq!(outcome(&m, "TCPRoute", "default", "raw"), Outcome::Ok);
    assert_eq!(outcome(&m, "ReferenceGrant", "default", "g"), Outcome::Ok);
    assert!(matches!(outcome(&m, "GRPCRoute", "default", "rpc"), Outcome::Warning(w) if w.contains("BackendNotFound")));
}
