//! Conformance cases about attachment and references (route conditions and the 500s they
//! imply), TCPRoute, the mesh (GAMMA) cases, and objects refused whole.
use super::*;

const H: &str = "gw.example";

fn http_route(name: &str, ns: &str, spec: &str) -> String {
    format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n")
}

#[test]
fn http_route_invalid_cross_namespace_backend_ref() {
    let g = load_case(&http_route(
        "invalid-cross-namespace-backend-ref",
        INFRA,
        "  parentRefs: [{name: same-namespace}]\n  rules: [{backendRefs: [{name: web-backend, namespace: gateway-conformance-web-backend, port: 8080}]}]",
    ));
    let r = "invalid-cross-namespace-backend-ref";
    assert_eq!(condition(&g, RouteKind::Http, INFRA, r, ConditionType::ResolvedRefs), (false, Reason::RefNotPermitted));
    assert_eq!(condition(&g, RouteKind::Http, INFRA, r, ConditionType::Accepted), (true, Reason::Accepted));
    check(&g, "same-namespace", 80, &[(get(H, "/"), "500")]);
}

#[test]
fn http_route_invalid_backend_ref_unknown_kind() {
    let g = load_case(&http_route(
        "invalid-backend-ref-unknown-kind",
        INFRA,
        "  parentRefs: [{name: same-namespace}]\n  rules: [{backendRefs: [{group: unknownkind.example.com, kind: NonExistent, name: infra-backend-v1, port: 8080}]}]",
    ));
    let r = "invalid-backend-ref-unknown-kind";
    assert_eq!(condition(&g, RouteKind::Http, INFRA, r, ConditionType::ResolvedRefs), (false, Reason::InvalidKind));
    check(&g, "same-namespace", 80, &[(get(H, "/v2"), "500")]);
}

#[test]
fn http_route_invalid_non_existent_backend_ref() {
    let g = load_case(&http_route(
        "invalid-nonexistent-backend-ref",
        INFRA,
        "  parentRefs: [{name: same-namespace}]\n  rules: [{backendRefs: [{name: nonexistent, namespace: gateway-conformance-infra, port: 8080}]}]",
    ));
    let r = "invalid-nonexistent-backend-ref";
    assert_eq!(condition(&g, RouteKind::Http, INFRA, r, ConditionType::ResolvedRefs), (false, Reason::BackendNotFound));
    check(&g, "same-namespace", 80, &[(get(H, "/"), "500")]);
}

const CROSS_NAMESPACE_BACKEND: &str =
    "  parentRefs: [{name: same-namespace}]\n  rules: [{backendRefs: [{name: web-backend, namespace: gateway-conformance-web-backend, port: 8080}]}]";

fn grant(name: &str, ns: &str, from: &str, to: &str) -> String {
    format!("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  from: [{from}]\n  to: [{to}]\n---\n")
}

#[test]
fn http_route_reference_grant() {
    let g = load_case(&format!(
        "{}{}",
        grant(
            "reference-grant",
            "gateway-conformance-web-backend",
            "{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: gateway-conformance-infra}",
            "{group: \"\", kind: Service, name: web-backend}"
        ),
        http_route("reference-grant", INFRA, CROSS_NAMESPACE_BACKEND)
    ));
    assert_eq!(
        condition(&g, RouteKind::Http, INFRA, "reference-grant", ConditionType::ResolvedRefs),
        (true, Reason::ResolvedRefs)
    );
    check(&g, "same-namespace", 80, &[(get(H, "/"), "web-backend")]);
}

#[test]
fn http_route_reference_grant_deleted_answers_500() {
    let g = load_case(&http_route("reference-grant", INFRA, CROSS_NAMESPACE_BACKEND));
    assert_eq!(
        condition(&g, RouteKind::Http, INFRA, "reference-grant", ConditionType::ResolvedRefs),
        (false, Reason::RefNotPermitted)
    );
    check(&g, "same-namespace", 80, &[(get(H, "/"), "500")]);
}

#[test]
fn http_route_invalid_reference_grant() {
    let infra_from = "{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: gateway-conformance-infra}";
    let svc = "{group: \"\", kind: Service, name: web-backend}";
    let web = "gateway-conformance-web-backend";
    let grants = [
        grant("reference-grant-wrong-namespace", INFRA, infra_from, svc),
        grant(
            "reference-grant-wrong-from-group",
            web,
            "{group: not-the-group-youre-looking-for, kind: HTTPRoute, namespace: gateway-conformance-infra}",
            svc,
        ),
        grant(
            "reference-grant-wrong-from-kind",
            web,
            "{group: gateway.networking.k8s.io, kind: Gateway, namespace: gateway-conformance-infra}",
            svc,
        ),
        grant(
            "reference-grant-wrong-from-namespace",
            web,
            "{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: not-the-namespace-youre-looking-for}",
            svc,
        ),
        grant(
            "reference-grant-wrong-to-group",
            web,
            infra_from,
            "{group: not-the-group-youre-looking-for, kind: Service, name: web-backend}",
        ),
        grant("reference-grant-wrong-to-kind", web, infra_from, "{group: \"\", kind: Secret, name: web-backend}"),
        grant(
            "reference-grant-wrong-to-name",
            web,
            infra_from,
            "{group: \"\", kind: Service, name: not-the-service-youre-looking-for}",
        ),
    ];
    let g = load_case(&format!("{}{}", grants.concat(), http_route("reference-grant", INFRA, CROSS_NAMESPACE_BACKEND)));
    assert_eq!(
        condition(&g, RouteKind::Http, INFRA, "reference-grant", ConditionType::ResolvedRefs),
        (false, Reason::RefNotPermitted)
    );
    check(&g, "same-namespace", 80, &[(get(H, "/"), "500")]);
}

#[test]
fn http_route_partially_invalid_via_invalid_reference_grant() {
    let g = load_case(&format!(
        "{}{}",
        grant(
            "invalid-reference-grant",
            "gateway-conformance-app-backend",
            "{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: gateway-conformance-infra}",
            "{group: \"\", kind: Service, name: app-backend-v1}"
        ),
        http_route(
            "invalid-reference-grant",
            INFRA,
            r#"
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: app-backend-v2, namespace: gateway-conformance-app-backend, port: 8080}]
  - backendRefs: [{name: app-backend-v1, namespace: gateway-conformance-app-backend, port: 8080}]"#
        )
    ));
    assert_eq!(
        condition(&g, RouteKind::Http, INFRA, "invalid-reference-grant", ConditionType::ResolvedRefs),
        (false, Reason::RefNotPermitted)
    );
    check(&g, "same-namespace", 80, &[(get(H, "/v2"), "500"), (get(H, "/"), "app-backend-v1")]);
}

#[test]
fn http_route_invalid_parent_ref_not_matching_listener_port() {
    let g = load_case(&http_route(
        "httproute-listener-not-matching-route-port",
        INFRA,
        "  parentRefs: [{name: same-namespace, namespace: gateway-conformance-infra, port: 81}]\n  rules: [{backendRefs: [{name: infra-backend-v1, kind: Service, port: 8080}]}]",
    ));
    let r = "httproute-listener-not-matching-route-port";
    assert_eq!(condition(&g, RouteKind::Http, INFRA, r, ConditionType::Accepted), (false, Reason::NoMatchingParent));
    assert_eq!(condition(&g, RouteKind::Http, INFRA, r, ConditionType::ResolvedRefs), (true, Reason::ResolvedRefs));
    check(&g, "same-namespace", 80, &[(get(H, "/"), "404")]);
}

#[test]
fn http_route_invalid_parent_ref_not_matching_section_name() {
    let g = load_case(&http_route(
        "httproute-listener-not-matching-section-name",
        INFRA,
        "  parentRefs: [{name: same-namespace, namespace: gateway-conformance-infra, port: 80, sectionName: http1}]\n  rules: [{backendRefs: [{name: infra-backend-v1, kind: Service, port: 8080}]}]",
    ));
    let r = "httproute-listener-not-matching-section-name";
    assert_eq!(condition(&g, RouteKind::Http, INFRA, r, ConditionType::Accepted), (false, Reason::NoMatchingParent));
}

#[test]
fn http_route_invalid_cross_namespace_parent_ref() {
    let ns = "gateway-conformance-web-backend";
    let g = load_case(&http_route(
        "invalid-cross-namespace-parent-ref",
        ns,
        "  parentRefs: [{name: same-namespace, namespace: gateway-conformance-infra}]\n  rules: [{backendRefs: [{name: web-backend, port: 8080}]}]",
    ));
    let r = "invalid-cross-namespace-parent-ref";
    assert_eq!(condition(&g, RouteKind::Http, ns, r, ConditionType::Accepted), (false, Reason::NotAllowedByListeners));
    assert_eq!(condition(&g, RouteKind::Http, ns, r, ConditionType::ResolvedRefs), (true, Reason::ResolvedRefs));
}

#[test]
fn http_route_cross_namespace() {
    let ns = "gateway-conformance-web-backend";
    let g = load_case(&http_route(
        "cross-namespace",
        ns,
        "  parentRefs: [{name: backend-namespaces, namespace: gateway-conformance-infra}]\n  rules: [{backendRefs: [{name: web-backend, port: 8080}]}]",
    ));
    assert_eq!(
        condition(&g, RouteKind::Http, ns, "cross-namespace", ConditionType::Accepted),
        (true, Reason::Accepted)
    );
    check(&g, "backend-namespaces", 80, &[(get(H, "/"), "web-backend")]);
}

#[test]
fn http_route_disallowed_kind() {
    let g = load_case(&format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: tlsroutes-only, namespace: gateway-conformance-infra}}
spec:
  gatewayClassName: istio
  listeners: [{{name: tls, port: 443, protocol: TLS, tls: {{mode: Passthrough}}, allowedRoutes: {{namespaces: {{from: Same}}, kinds: [{{kind: TLSRoute}}]}}}}]
---
{}"#,
        http_route(
            "disallowed-kind",
            INFRA,
            "  parentRefs: [{name: tlsroutes-only, namespace: gateway-conformance-infra}]\n  rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]"
        )
    ));
    assert_eq!(
        condition(&g, RouteKind::Http, INFRA, "disallowed-kind", ConditionType::Accepted),
        (false, Reason::NotAllowedByListeners)
    );
}

/// Not a conformance case: with two backends of equal weight and one unresolved, half the
/// requests get 500 (the spec's example); a gRPC rule answers 503 (UNAVAILABLE) instead.
#[test]
fn an_unresolved_backend_gets_its_share_of_requests_answered_500() {
    let g = load_case(&format!(
        r#"
{}apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: grpc, namespace: gateway-conformance-infra}}
spec:
  parentRefs: [{{name: all-namespaces}}]
  rules: [{{backendRefs: [{{name: nonexistent, port: 8080}}]}}]
"#,
        http_route(
            "half",
            INFRA,
            "  parentRefs: [{name: same-namespace}]\n  rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}, {name: nonexistent, port: 8080}]}]"
        )
    ));
    let p = g.for_gateway(INFRA, "same-namespace", 80, H).unwrap();
    let outcomes: Vec<String> = (0..4)
        .map(|roll| match p.decide(&get(H, "/"), roll) {
            Decision::Forward { destination, .. } => destination.host.split('.').next().unwrap().to_string(),
            Decision::Respond { status, .. } => status.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(outcomes, vec!["infra-backend-v1", "500", "infra-backend-v1", "500"]);
    check(&g, "all-namespaces", 80, &[(req("POST", H, "/pkg.Svc/Echo", &[]), "503")]);
}

/// Not a conformance case: an unsupported filter drops its rule (PartiallyInvalid) and the
/// others run; a route whose rules are all invalid is not accepted.
#[test]
fn an_invalid_rule_is_dropped_and_the_route_marked_partially_invalid() {
    let g = load_case(&format!(
        "{}{}",
        http_route(
            "partly",
            INFRA,
            r#"
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /bad}}]
    filters: [{type: ExternalAuth}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - backendRefs: [{name: infra-backend-v1, port: 8080}]"#
        ),
        http_route(
            "wholly",
            INFRA,
            "  parentRefs: [{name: all-namespaces}]\n  rules:\n  - matches: [{path: {type: RegularExpression, value: \"(\"}}]\n    backendRefs: [{name: infra-backend-v2, port: 8080}]"
        )
    ));
    assert_eq!(condition(&g, RouteKind::Http, INFRA, "partly", ConditionType::Accepted), (true, Reason::Accepted));
    assert_eq!(
        condition(&g, RouteKind::Http, INFRA, "partly", ConditionType::PartiallyInvalid),
        (true, Reason::UnsupportedValue)
    );
    check(&g, "same-namespace", 80, &[(get(H, "/bad"), "infra-backend-v1")]);
    assert_eq!(
        condition(&g, RouteKind::Http, INFRA, "wholly", ConditionType::Accepted),
        (false, Reason::UnsupportedValue)
    );
    check(&g, "all-namespaces", 80, &[(get(H, "/"), "404")]);
}

/// Not a conformance case: RequestRedirect with URLRewrite in one rule is refused.
#[test]
fn redirect_and_rewrite_in_one_rule_are_incompatible_filters() {
    let g = load_case(&http_route(
        "both",
        INFRA,
        r#"
  parentRefs: [{name: same-namespace}]
  rules:
  - filters: [{type: RequestRedirect, requestRedirect: {hostname: a.example}}, {type: URLRewrite, urlRewrite: {hostname: b.example}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]"#,
    ));
    assert_eq!(
        condition(&g, RouteKind::Http, INFRA, "both", ConditionType::Accepted),
        (false, Reason::IncompatibleFilters)
    );
}

/// Not a conformance case: equal matches across routes go to the oldest route, then the
/// first by `namespace/name`.
#[test]
fn ties_across_routes_go_to_the_oldest_then_the_first_by_name() {
    let dated = |name: &str, created: &str, backend: &str| {
        format!(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: gateway-conformance-infra, creationTimestamp: "{created}"}}
spec:
  parentRefs: [{{name: same-namespace}}]
  rules: [{{matches: [{{path: {{type: PathPrefix, value: /x}}}}], backendRefs: [{{name: {backend}, port: 8080}}]}}]
---
"#
        )
    };
    let g = load_case(
        &[
            dated("a-newer", "2024-02-01T00:00:00Z", "infra-backend-v1"),
            dated("z-older", "2024-01-01T00:00:00Z", "infra-backend-v2"),
            dated("b-older-too", "2024-01-01T00:00:00Z", "infra-backend-v3"),
        ]
        .concat(),
    );
    check(&g, "same-namespace", 80, &[(get(H, "/x"), "infra-backend-v3")]);
    let p = g.for_gateway(INFRA, "same-namespace", 80, H).unwrap();
    let names: Vec<&str> = p.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["b-older-too", "z-older", "a-newer"]);
    let (origin, rule) = p.origin(p.decide(&get(H, "/x"), 0).rule()).unwrap();
    assert_eq!((origin.name.as_str(), rule), ("b-older-too", 0));
}

/// Not a conformance case: an HTTPRoute and a GRPCRoute sharing a hostname on one
/// listener — only the older is used, the other is not accepted.
#[test]
fn an_http_and_a_grpc_route_sharing_a_hostname_keep_only_the_older() {
    let g = load_case(&format!(
        r#"
{}apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: newer-grpc, namespace: gateway-conformance-infra, creationTimestamp: "2024-02-01T00:00:00Z"}}
spec:
  parentRefs: [{{name: same-namespace}}]
  hostnames: ["*.example.com"]
  rules: [{{backendRefs: [{{name: grpc-infra-backend-v1, port: 8080}}]}}]
"#,
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: older-http, namespace: gateway-conformance-infra, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  parentRefs: [{name: same-namespace}]
  hostnames: [a.example.com]
  rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]
---
"#
    ));
    assert_eq!(
        condition(&g, RouteKind::Grpc, INFRA, "newer-grpc", ConditionType::Accepted),
        (false, Reason::Conflicted)
    );
    assert_eq!(condition(&g, RouteKind::Http, INFRA, "older-http", ConditionType::Accepted), (true, Reason::Accepted));
    check(
        &g,
        "same-namespace",
        80,
        &[(get("a.example.com", "/"), "infra-backend-v1"), (get("b.example.com", "/"), "404")],
    );
}

/// Not a conformance case: what the API server would refuse is rejected with its name and
/// reason, and gets no status; Gateways of other classes are not ours.
#[test]
fn malformed_objects_are_rejected_with_their_name_and_reason() {
    let g = load_case_allowing_rejects(
        r#"
apiVersion: gateway.networking.k8s.io/v2
kind: HTTPRoute
metadata: {name: future, namespace: gateway-conformance-infra}
spec: {parentRefs: [{name: same-namespace}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: no-port, namespace: gateway-conformance-infra}
spec: {parentRefs: [{name: same-namespace}], rules: [{backendRefs: [{name: infra-backend-v1}]}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad-shape, namespace: gateway-conformance-infra}
spec: {parentRefs: {name: same-namespace}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: relative-path, namespace: gateway-conformance-infra}
spec: {parentRefs: [{name: same-namespace}], rules: [{matches: [{path: {value: x}}], backendRefs: [{name: infra-backend-v1, port: 8080}]}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: other-class, namespace: gateway-conformance-infra}
spec: {gatewayClassName: someone-else, listeners: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: elsewhere, namespace: gateway-conformance-infra}
spec: {parentRefs: [{name: other-class}], rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]}
"#,
    );
    let rejected: Vec<(String, String)> = g.rejected.iter().map(|e| (e.name().to_string(), e.to_string())).collect();
    let names: Vec<&str> = rejected.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "gateway-conformance-infra/future",
            "gateway-conformance-infra/no-port",
            "gateway-conformance-infra/bad-shape",
            "gateway-conformance-infra/relative-path"
        ]
    );
    assert!(rejected[0].1.contains("apiVersion"), "{rejected:?}");
    assert!(rejected[1].1.contains("needs a port"), "{rejected:?}");
    assert!(rejected[2].1.contains("does not parse"), "{rejected:?}");
    assert!(rejected[3].1.contains("must start with /"), "{rejected:?}");
    assert_eq!(g.status_of(RouteKind::Http, INFRA, "elsewhere").count(), 0, "not our Gateway: no status");
    assert!(g.parents.keys().all(|k| !matches!(k, ParentKey::Gateway { name, .. } if name == "other-class")));
}

const TCP_BASE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: tcp-backend-v1, namespace: gateway-conformance-infra}
spec: {ports: [{port: 3000}]}
---
apiVersion: v1
kind: Service
metadata: {name: tcp-backend-v2, namespace: gateway-conformance-infra}
spec: {ports: [{port: 3000}]}
---
apiVersion: v1
kind: Service
metadata: {name: tcp-backend-v3, namespace: gateway-conformance-infra}
spec: {ports: [{port: 3000}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: tcp-gateway, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: istio
  listeners: [{name: tcp, protocol: TCP, port: 9300, allowedRoutes: {kinds: [{kind: TCPRoute}]}}]
---
"#;

fn tcp_route(name: &str, created: &str, rules: &str) -> String {
    format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: {name}, namespace: gateway-conformance-infra, creationTimestamp: "{created}"}}
spec:
  parentRefs: [{{name: tcp-gateway, sectionName: tcp}}]
  rules: {rules}
---
"#
    )
}

/// The TCP backends of the tcp-gateway's listener: (service name, weight).
fn tcp_targets(g: &GatewayRoutes) -> Vec<(String, u32)> {
    let p =
        &g.parents[&ParentKey::Gateway { namespace: INFRA.into(), name: "tcp-gateway".into(), section: "tcp".into() }];
    p.tcp_targets(9300).unwrap().iter().map(|(d, w)| (d.host.split('.').next().unwrap().to_string(), *w)).collect()
}

#[test]
fn tcp_route_weighted_routing() {
    let g = load_case(&format!(
        "{TCP_BASE}{}",
        tcp_route(
            "tcp-weighted-route",
            "2024-01-01T00:00:00Z",
            "[{backendRefs: [{name: tcp-backend-v1, port: 3000, weight: 70}, {name: tcp-backend-v2, port: 3000, weight: 30}, {name: tcp-backend-v3, port: 3000, weight: 0}]}]"
        )
    ));
    assert_eq!(tcp_targets(&g), vec![("tcp-backend-v1".to_string(), 70), ("tcp-backend-v2".to_string(), 30)]);
}

#[test]
fn tcp_route_multiple_routes_attachment() {
    let g = load_case(&format!(
        "{TCP_BASE}{}{}",
        tcp_route(
            "tcproute-attach-newer",
            "2024-02-01T00:00:00Z",
            "[{backendRefs: [{name: tcp-backend-v2, port: 3000}]}]"
        ),
        tcp_route(
            "tcproute-attach-older",
            "2024-01-01T00:00:00Z",
            "[{backendRefs: [{name: tcp-backend-v1, port: 3000}]}]"
        ),
    ));
    for r in ["tcproute-attach-older", "tcproute-attach-newer"] {
        assert_eq!(condition(&g, RouteKind::Tcp, INFRA, r, ConditionType::Accepted), (true, Reason::Accepted), "{r}");
    }
    assert_eq!(tcp_targets(&g), vec![("tcp-backend-v1".to_string(), 100)], "only the oldest takes connections");
}

#[test]
fn tcp_route_invalid_non_tcp_listener() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: tcp-mixed-protocol-gateway, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: istio
  listeners: [{name: only-allow-http-routes, protocol: HTTP, port: 5300, allowedRoutes: {kinds: [{kind: HTTPRoute}]}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: tcp-route, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: tcp-mixed-protocol-gateway, sectionName: only-allow-http-routes}]
  rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]
"#,
    );
    assert_eq!(
        condition(&g, RouteKind::Tcp, INFRA, "tcp-route", ConditionType::Accepted),
        (false, Reason::NotAllowedByListeners)
    );
}

#[test]
fn tcp_route_invalid_cross_namespace_backend_ref() {
    let g = load_case(&format!(
        "{TCP_BASE}{}",
        tcp_route(
            "tcp-route",
            "",
            "[{backendRefs: [{name: web-backend, namespace: gateway-conformance-web-backend, port: 8080}]}]"
        )
    ));
    assert_eq!(
        condition(&g, RouteKind::Tcp, INFRA, "tcp-route", ConditionType::ResolvedRefs),
        (false, Reason::RefNotPermitted)
    );
    assert_eq!(tcp_targets(&g), vec![(INVALID_BACKEND.split('.').next().unwrap().to_string(), 100)], "refused");
}

/// The mesh fixtures: Services `echo`, `echo-v1`, `echo-v2` (ports 80 and 8080) and a
/// consumer namespace.
const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: gateway-conformance-mesh}
spec: {ports: [{name: http, port: 80}, {name: http-alt, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: gateway-conformance-mesh}
spec: {ports: [{name: http, port: 80}, {name: http-alt, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: gateway-conformance-mesh}
spec: {ports: [{name: http, port: 80}, {name: http-alt, port: 8080}]}
---
"#;

const MESH_NS: &str = "gateway-conformance-mesh";

/// What a client in `client_ns` sees calling `service:port` with `path`, and the response
/// header `x-header-set` the routes add (`-` when none).
fn mesh_call(g: &GatewayRoutes, service: &str, port: u16, client_ns: &str, path: &str) -> (String, String) {
    let q = Request { port, ..get(service, path) };
    match g.for_service(MESH_NS, service, port, Some(client_ns)) {
        None => (service.to_string(), "-".into()),
        Some(p) => {
            let d = p.decide(&q, 0);
            let set = p
                .router
                .rule(d.rule())
                .and_then(|r| r.headers.clone())
                .and_then(|h| h.response)
                .and_then(|r| r.set.get("x-header-set").cloned())
                .unwrap_or_else(|| "-".into());
            (answer(p, &q), set)
        }
    }
}

fn mesh_route(name: &str, ns: &str, parent: &str, rules: &str) -> String {
    format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs: [{parent}]\n  rules:\n{rules}\n---\n")
}

fn set_header(value: &str, backend: &str) -> String {
    format!("  - filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: X-Header-Set, value: {value}}}]}}}}]\n    backendRefs: [{{name: {backend}, port: 80}}]")
}

#[test]
fn mesh_split() {
    let g = load_case(&format!(
        "{MESH}{}",
        mesh_route(
            "mesh-split",
            MESH_NS,
            "{group: \"\", kind: Service, name: echo}",
            "  - matches: [{path: {type: Exact, value: /v1}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n  - matches: [{path: {type: Exact, value: /v2}}]\n    backendRefs: [{name: echo-v2, port: 80}]"
        )
    ));
    assert_eq!(mesh_call(&g, "echo", 80, MESH_NS, "/v1").0, "echo-v1");
    assert_eq!(mesh_call(&g, "echo", 80, MESH_NS, "/v2").0, "echo-v2");
    assert_eq!(mesh_call(&g, "echo", 80, MESH_NS, "/").0, "404", "routes attached and none matches");
}

#[test]
fn mesh_ports() {
    let g = load_case(&format!(
        "{MESH}{}{}",
        mesh_route(
            "mesh-split-v1",
            MESH_NS,
            "{group: \"\", kind: Service, name: echo-v1, port: 80}",
            &set_header("v1", "echo-v1")
        ),
        mesh_route(
            "mesh-split-v2",
            MESH_NS,
            "{group: \"\", kind: Service, name: echo-v2}",
            &set_header("v2", "echo-v2")
        ),
    ));
    assert_eq!(mesh_call(&g, "echo-v1", 80, MESH_NS, "/"), ("echo-v1".to_string(), "v1".to_string()));
    assert_eq!(mesh_call(&g, "echo-v1", 8080, MESH_NS, "/"), ("echo-v1".to_string(), "-".to_string()), "excluded port");
    assert_eq!(mesh_call(&g, "echo-v2", 80, MESH_NS, "/"), ("echo-v2".to_string(), "v2".to_string()));
    assert_eq!(mesh_call(&g, "echo-v2", 8080, MESH_NS, "/"), ("echo-v2".to_string(), "v2".to_string()));
}

#[test]
fn mesh_consumer_route() {
    let g = load_case(&format!(
        "{MESH}{}",
        mesh_route(
            "mesh-echo-add-header",
            "gateway-conformance-mesh-consumer",
            "{group: \"\", kind: Service, name: echo-v1, namespace: gateway-conformance-mesh}",
            "  - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Header-Set, value: set}]}}]\n    backendRefs: [{name: echo-v1, namespace: gateway-conformance-mesh, port: 80}]"
        )
    ));
    // A mesh route's backend in another namespace needs no ReferenceGrant (GEP-1294).
    let consumer = "gateway-conformance-mesh-consumer";
    assert_eq!(mesh_call(&g, "echo-v1", 80, consumer, "/"), ("echo-v1".to_string(), "set".to_string()));
    assert_eq!(mesh_call(&g, "echo-v1", 80, MESH_NS, "/"), ("echo-v1".to_string(), "-".to_string()), "other clients");
}

#[test]
fn mesh_frontend_hostname_is_the_service_not_the_host_header() {
    let g = load_case(&format!(
        "{MESH}{}",
        mesh_route(
            "mesh-split-v1",
            MESH_NS,
            "{group: \"\", kind: Service, name: echo-v2}",
            &set_header("set", "echo-v2")
        )
    ));
    // Sent to echo-v2 with `Host: echo-v1`: the Service decides, the header does not.
    let q = Request { port: 80, ..get("echo-v1", "/") };
    let p = g.for_service(MESH_NS, "echo-v2", 80, Some(MESH_NS)).unwrap();
    assert_eq!(answer(p, &q), "echo-v2");
    assert!(g.for_service(MESH_NS, "echo-v1", 80, Some(MESH_NS)).is_none(), "no route for echo-v1");
}

/// Not a conformance case: a waypoint's Gateway (class istio-waypoint, HBONE listener)
/// takes HTTP routes too.
#[test]
fn a_waypoint_gateway_takes_http_routes_on_its_hbone_listener() {
    let g = load_case(&format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: gateway-conformance-infra}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
{}"#,
        http_route(
            "via-waypoint",
            INFRA,
            "  parentRefs: [{name: waypoint}]\n  rules: [{backendRefs: [{name: infra-backend-v2, port: 8080}]}]"
        )
    ));
    assert_eq!(
        condition(&g, RouteKind::Http, INFRA, "via-waypoint", ConditionType::Accepted),
        (true, Reason::Accepted)
    );
    let p =
        &g.parents[&ParentKey::Gateway { namespace: INFRA.into(), name: "waypoint".into(), section: "mesh".into() }];
    assert_eq!(answer(p, &get("reviews", "/")), "infra-backend-v2");
}
