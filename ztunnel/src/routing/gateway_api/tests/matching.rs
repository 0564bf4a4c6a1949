//! Precedence and match conformance cases: which backend a request reaches.
use super::*;

#[test]
fn http_route_matching_across_routes() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: matching-part1, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  hostnames: [example.com, example.net]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /}
    - headers: [{name: version, value: one}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: matching-part2, namespace: gateway-conformance-infra}
spec:
  hostnames: [example.com]
  parentRefs: [{name: same-namespace}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /v2}
    - headers: [{name: version, value: two}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
"#,
    );
    check(
        &g,
        "same-namespace",
        80,
        &[
            (get("example.com", "/"), "infra-backend-v1"),
            (get("example.com", "/example"), "infra-backend-v1"),
            (get("example.net", "/example"), "infra-backend-v1"),
            (req("GET", "example.com", "/example", &[("Version", "one")]), "infra-backend-v1"),
            (get("example.com", "/v2"), "infra-backend-v2"),
            (get("example.net", "/v2"), "infra-backend-v1"),
            (get("example.com", "/v2/example"), "infra-backend-v2"),
            (req("GET", "example.com", "/", &[("Version", "two")]), "infra-backend-v2"),
        ],
    );
}

#[test]
fn http_route_matching() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: matching, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /}
    - headers: [{name: version, value: one}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /v2}
    - headers: [{name: version, value: two}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
"#,
    );
    let h = "gw.example";
    check(
        &g,
        "same-namespace",
        80,
        &[
            (get(h, "/"), "infra-backend-v1"),
            (get(h, "/example"), "infra-backend-v1"),
            (req("GET", h, "/", &[("Version", "one")]), "infra-backend-v1"),
            (get(h, "/v2"), "infra-backend-v2"),
            (get(h, "/v2/example"), "infra-backend-v2"),
            (req("GET", h, "/", &[("Version", "two")]), "infra-backend-v2"),
            (get(h, "/v2/"), "infra-backend-v2"),
            (get(h, "/v2example"), "infra-backend-v1"),
            (get(h, "/foo/v2/example"), "infra-backend-v1"),
        ],
    );
}

#[test]
fn http_route_path_match_order() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: path-matching-order, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{path: {type: Exact, value: /match}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: Exact, value: /match/exact}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{path: {type: Exact, value: /match/exact/one}}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /match/}}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /match/prefix/}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /match/prefix/one}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
"#,
    );
    let h = "gw.example";
    check(
        &g,
        "same-namespace",
        80,
        &[
            (get(h, "/match/exact/one"), "infra-backend-v3"),
            (get(h, "/match/exact"), "infra-backend-v2"),
            (get(h, "/match"), "infra-backend-v1"),
            (get(h, "/match/prefix/one/any"), "infra-backend-v2"),
            (get(h, "/match/prefix/any"), "infra-backend-v1"),
            (get(h, "/match/any"), "infra-backend-v3"),
        ],
    );
}

/// The Gateway and routes of HTTPRouteHostnameIntersection.
const HOSTNAME_INTERSECTION: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: httproute-hostname-intersection, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: istio
  listeners:
  - {name: listener-1, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}, hostname: very.specific.com}
  - {name: listener-2, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}, hostname: "*.wildcard.io"}
  - {name: listener-3, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}, hostname: "*.anotherwildcard.io"}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: httproute-hostname-intersection-all, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: istio
  listeners:
  - {name: listener-1, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: specific-host-matches-listener-specific-host, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: httproute-hostname-intersection, namespace: gateway-conformance-infra}]
  hostnames: [non.matching.com, "*.nonmatchingwildcard.io", very.specific.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /s1}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: specific-host-matches-listener-wildcard-host, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: httproute-hostname-intersection, namespace: gateway-conformance-infra}]
  hostnames: [non.matching.com, wildcard.io, foo.wildcard.io, bar.wildcard.io, foo.bar.wildcard.io]
  rules:
  - matches: [{path: {type: PathPrefix, value: /s2}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: wildcard-host-matches-listener-specific-host, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: httproute-hostname-intersection, namespace: gateway-conformance-infra}]
  hostnames: [non.matching.com, "*.specific.com"]
  rules:
  - matches: [{path: {type: PathPrefix, value: /s3}}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: wildcard-host-matches-listener-wildcard-host, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: httproute-hostname-intersection, namespace: gateway-conformance-infra}]
  hostnames: ["*.anotherwildcard.io"]
  rules:
  - matches: [{path: {type: PathPrefix, value: /s4}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: no-intersecting-hosts, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: httproute-hostname-intersection, namespace: gateway-conformance-infra}]
  hostnames: [specific.but.wrong.com, wildcard.io]
  rules:
  - matches: [{path: {type: PathPrefix, value: /s5}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: httproute-hostname-intersection-all, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: httproute-hostname-intersection-all, namespace: gateway-conformance-infra}]
  hostnames: [first.com, sub.first.com, second.com, sub.second.com]
  rules:
  - backendRefs: [{name: infra-backend-v2, port: 8080}]
"#;

#[test]
fn http_route_hostname_intersection() {
    let g = load_case(HOSTNAME_INTERSECTION);
    let gw = "httproute-hostname-intersection";
    check(
        &g,
        gw,
        80,
        &[
            (get("very.specific.com", "/s1"), "infra-backend-v1"),
            (get("very.specific.com:1234", "/s1"), "infra-backend-v1"),
            (get("non.matching.com", "/s1"), "404"),
            (get("foo.nonmatchingwildcard.io", "/s1"), "404"),
            (get("foo.wildcard.io", "/s1"), "404"),
            (get("very.specific.com", "/non-matching-prefix"), "404"),
            (get("foo.wildcard.io", "/s2"), "infra-backend-v2"),
            (get("bar.wildcard.io", "/s2"), "infra-backend-v2"),
            (get("foo.bar.wildcard.io", "/s2"), "infra-backend-v2"),
            (get("non.matching.com", "/s2"), "404"),
            (get("wildcard.io", "/s2"), "404"),
            (get("very.specific.com", "/s2"), "404"),
            (get("foo.wildcard.io", "/non-matching-prefix"), "404"),
            (get("very.specific.com", "/s3"), "infra-backend-v3"),
            (get("non.matching.com", "/s3"), "404"),
            (get("foo.specific.com", "/s3"), "404"),
            (get("foo.wildcard.io", "/s3"), "404"),
            (get("foo.anotherwildcard.io", "/s4"), "infra-backend-v1"),
            (get("bar.anotherwildcard.io", "/s4"), "infra-backend-v1"),
            (get("foo.bar.anotherwildcard.io", "/s4"), "infra-backend-v1"),
            (get("anotherwildcard.io", "/s4"), "404"),
            (get("foo.wildcard.io", "/s4"), "404"),
            (get("very.specific.com", "/s4"), "404"),
        ],
    );
    for r in [
        "specific-host-matches-listener-specific-host",
        "specific-host-matches-listener-wildcard-host",
        "wildcard-host-matches-listener-specific-host",
        "wildcard-host-matches-listener-wildcard-host",
    ] {
        assert_eq!(condition(&g, RouteKind::Http, INFRA, r, ConditionType::Accepted), (true, Reason::Accepted), "{r}");
    }
}

#[test]
fn http_route_hostname_intersection_without_intersecting_hosts_is_not_accepted() {
    let g = load_case(HOSTNAME_INTERSECTION);
    assert_eq!(
        condition(&g, RouteKind::Http, INFRA, "no-intersecting-hosts", ConditionType::Accepted),
        (false, Reason::NoMatchingListenerHostname)
    );
    check(
        &g,
        "httproute-hostname-intersection",
        80,
        &[(get("specific.but.wrong.com", "/s5"), "404"), (get("wildcard.io", "/s5"), "404")],
    );
}

#[test]
fn http_route_hostname_intersection_with_an_unspecified_hostname_listener() {
    let g = load_case(HOSTNAME_INTERSECTION);
    check(
        &g,
        "httproute-hostname-intersection-all",
        80,
        &[
            (get("first.com", "/"), "infra-backend-v2"),
            (get("sub.first.com", "/"), "infra-backend-v2"),
            (get("second.com", "/"), "infra-backend-v2"),
            (get("sub.second.com", "/"), "infra-backend-v2"),
            (get("third.com", "/"), "404"),
            (get("sub.third.com", "/"), "404"),
        ],
    );
}

#[test]
fn http_route_listener_hostname_matching() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: httproute-listener-hostname-matching, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: istio
  listeners:
  - {name: listener-1, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}, hostname: bar.com}
  - {name: listener-2, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}, hostname: foo.bar.com}
  - {name: listener-3, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}, hostname: "*.bar.com"}
  - {name: listener-4, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}, hostname: "*.foo.com"}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-v1, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: httproute-listener-hostname-matching, namespace: gateway-conformance-infra, sectionName: listener-1}]
  rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-v2, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: httproute-listener-hostname-matching, namespace: gateway-conformance-infra, sectionName: listener-2}]
  rules: [{backendRefs: [{name: infra-backend-v2, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-v3, namespace: gateway-conformance-infra}
spec:
  parentRefs:
  - {name: httproute-listener-hostname-matching, namespace: gateway-conformance-infra, sectionName: listener-3}
  - {name: httproute-listener-hostname-matching, namespace: gateway-conformance-infra, sectionName: listener-4}
  rules: [{backendRefs: [{name: infra-backend-v3, port: 8080}]}]
"#,
    );
    check(
        &g,
        "httproute-listener-hostname-matching",
        80,
        &[
            (get("bar.com", "/"), "infra-backend-v1"),
            (get("foo.bar.com", "/"), "infra-backend-v2"),
            (get("baz.bar.com", "/"), "infra-backend-v3"),
            (get("boo.bar.com", "/"), "infra-backend-v3"),
            (get("multiple.prefixes.bar.com", "/"), "infra-backend-v3"),
            (get("multiple.prefixes.foo.com", "/"), "infra-backend-v3"),
            (get("foo.com", "/"), "404"),
            (get("no.matching.host", "/"), "404"),
        ],
    );
}

#[test]
fn http_route_listener_port_matching() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: httproute-listener-port-matching, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: istio
  listeners:
  - {name: listener-1, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}, hostname: foo.com}
  - {name: listener-2, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}, hostname: foo.com}
  - {name: listener-3, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}, hostname: bar.com}
  - {name: listener-4, port: 8090, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}, hostname: foo.com}
  - {name: listener-5, port: 8090, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}, hostname: bar.com}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-v1, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: httproute-listener-port-matching, namespace: gateway-conformance-infra, port: 80}]
  rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-v2, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: httproute-listener-port-matching, namespace: gateway-conformance-infra, port: 8080}]
  rules: [{backendRefs: [{name: infra-backend-v2, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-v3, namespace: gateway-conformance-infra}
spec:
  parentRefs:
  - {name: httproute-listener-port-matching, namespace: gateway-conformance-infra, port: 8090, sectionName: listener-4}
  rules: [{backendRefs: [{name: infra-backend-v3, port: 8080}]}]
"#,
    );
    let gw = "httproute-listener-port-matching";
    check(&g, gw, 80, &[(get("foo.com", "/"), "infra-backend-v1")]);
    check(
        &g,
        gw,
        8080,
        &[(get("foo.com:8080", "/"), "infra-backend-v2"), (get("bar.com:8080", "/"), "infra-backend-v2")],
    );
    check(&g, gw, 8090, &[(get("foo.com:8090", "/"), "infra-backend-v3"), (get("bar.com:8090", "/"), "404")]);
}

#[test]
fn http_route_header_matching() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: header-matching, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{headers: [{name: version, value: one}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: version, value: two}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{headers: [{name: version, value: two}, {name: color, value: orange}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: color, value: blue}]}, {headers: [{name: color, value: green}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: color, value: red}]}, {headers: [{name: color, value: yellow}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
"#,
    );
    let with = |h: &[(&str, &str)]| req("GET", "gw.example", "/", h);
    check(
        &g,
        "same-namespace",
        80,
        &[
            (with(&[("Version", "one")]), "infra-backend-v1"),
            (with(&[("Version", "two")]), "infra-backend-v2"),
            (with(&[("Version", "two"), ("Color", "orange")]), "infra-backend-v1"),
            (with(&[("Version", "two"), ("Color", "blue")]), "infra-backend-v2"),
            (with(&[("Color", "orange")]), "404"),
            (with(&[("Some-Other-Header", "one")]), "404"),
            (with(&[("Color", "blue")]), "infra-backend-v1"),
            (with(&[("Color", "green")]), "infra-backend-v1"),
            (with(&[("Color", "red")]), "infra-backend-v2"),
            (with(&[("Color", "yellow")]), "infra-backend-v2"),
            (with(&[("Color", "purple")]), "404"),
        ],
    );
}

#[test]
fn http_route_query_param_matching() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: query-param-matching, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{queryParams: [{name: animal, value: dolphin}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches:
    - queryParams: [{name: animal, value: dolphin}, {name: color, value: blue}]
    - queryParams: [{name: ANIMAL, value: Whale}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path1}, queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: version, value: one}], queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /path2}
      headers: [{name: version, value: two}]
      queryParams: [{name: animal, value: whale}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /path3}
      queryParams: [{name: animal, value: shark}]
    - path: {type: PathPrefix, value: /path4}
      headers: [{name: version, value: three}]
      queryParams: [{name: animal, value: kraken}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path5}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{queryParams: [{name: animal, value: hydra}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{headers: [{name: version, value: four}]}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
"#,
    );
    let h = "gw.example";
    check(
        &g,
        "same-namespace",
        80,
        &[
            (get(h, "/?animal=whale"), "infra-backend-v1"),
            (get(h, "/?animal=dolphin"), "infra-backend-v2"),
            (get(h, "/?animal=dolphin&color=blue"), "infra-backend-v3"),
            (get(h, "/?ANIMAL=Whale"), "infra-backend-v3"),
            (get(h, "/?animal=whale&otherparam=irrelevant"), "infra-backend-v1"),
            (get(h, "/?animal=dolphin&color=yellow"), "infra-backend-v2"),
            (get(h, "/?color=blue"), "404"),
            (get(h, "/?animal=dog"), "404"),
            (get(h, "/?animal=whaledolphin"), "404"),
            (get(h, "/"), "404"),
            (get(h, "/path1?animal=whale"), "infra-backend-v1"),
            (req("GET", h, "/?animal=whale", &[("version", "one")]), "infra-backend-v2"),
            (req("GET", h, "/path2?animal=whale", &[("version", "two")]), "infra-backend-v3"),
            (get(h, "/path3?animal=shark"), "infra-backend-v1"),
            (req("GET", h, "/path4?animal=kraken", &[("version", "three")]), "infra-backend-v1"),
            (get(h, "/?animal=shark"), "404"),
            (get(h, "/path4?animal=kraken"), "404"),
            (get(h, "/path5?animal=hydra"), "infra-backend-v1"),
            (req("GET", h, "/?animal=hydra", &[("version", "four")]), "infra-backend-v3"),
        ],
    );
}

#[test]
fn http_route_method_matching() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: method-matching, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{method: POST}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{method: GET}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path1}, method: GET}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: version, value: one}], method: PUT}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path2}, headers: [{name: version, value: two}], method: POST}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches:
    - {path: {type: PathPrefix, value: /path3}, method: PATCH}
    - {path: {type: PathPrefix, value: /path4}, headers: [{name: version, value: three}], method: DELETE}
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path5}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{method: PATCH}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{headers: [{name: version, value: four}]}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
"#,
    );
    let h = "gw.example";
    check(
        &g,
        "same-namespace",
        80,
        &[
            (req("POST", h, "/", &[]), "infra-backend-v1"),
            (req("GET", h, "/", &[]), "infra-backend-v2"),
            (req("HEAD", h, "/", &[]), "404"),
            (req("GET", h, "/path1", &[]), "infra-backend-v1"),
            (req("PUT", h, "/", &[("version", "one")]), "infra-backend-v2"),
            (req("POST", h, "/path2", &[("version", "two")]), "infra-backend-v3"),
            (req("PATCH", h, "/path3", &[]), "infra-backend-v1"),
            (req("DELETE", h, "/path4", &[("version", "three")]), "infra-backend-v1"),
            (req("PUT", h, "/", &[]), "404"),
            (req("DELETE", h, "/path4", &[]), "404"),
            (req("PATCH", h, "/path5", &[]), "infra-backend-v1"),
            (req("PATCH", h, "/", &[("version", "four")]), "infra-backend-v2"),
        ],
    );
}

#[test]
fn http_route_exact_path_matching() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: exact-matching, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{path: {type: Exact, value: /one}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: Exact, value: /two}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
"#,
    );
    let h = "gw.example";
    check(
        &g,
        "same-namespace",
        80,
        &[
            (get(h, "/one"), "infra-backend-v1"),
            (get(h, "/two"), "infra-backend-v2"),
            (get(h, "/"), "404"),
            (get(h, "/one/example"), "404"),
            (get(h, "/two/"), "404"),
            (get(h, "/Two"), "404"),
        ],
    );
}

/// Not a conformance case (RegularExpression is implementation-specific): RE2 regexes
/// matching the whole path, header value or query value, ranked below a segment prefix
/// and above the catch-all `/`.
#[test]
fn regular_expression_matches_are_whole_string_and_rank_between_prefix_and_catch_all() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: regex, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches: [{path: {type: RegularExpression, value: "/api/v[0-9]+"}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /api/v1}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches:
    - headers: [{type: RegularExpression, name: x-id, value: "[a-f]+"}]
      queryParams: [{type: RegularExpression, name: q, value: "x.*"}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
"#,
    );
    let h = "gw.example";
    check(
        &g,
        "same-namespace",
        80,
        &[
            (get(h, "/api/v2"), "infra-backend-v1"),
            (get(h, "/api/v2/x"), "infra-backend-v3"),
            (get(h, "/api/v1"), "infra-backend-v2"),
            (req("GET", h, "/z?q=xyz", &[("x-id", "abc")]), "infra-backend-v1"),
            (req("GET", h, "/z?q=xyz", &[("x-id", "abcz")]), "infra-backend-v3"),
        ],
    );
}

/// Not a conformance case: the PathPrefix rule as the spec words it.
#[test]
fn path_prefix_matches_whole_segments_and_ignores_a_trailing_slash() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: prefix, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /abc/}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
"#,
    );
    let h = "gw.example";
    check(
        &g,
        "same-namespace",
        80,
        &[
            (get(h, "/abc"), "infra-backend-v1"),
            (get(h, "/abc/"), "infra-backend-v1"),
            (get(h, "/abc/def?x=1"), "infra-backend-v1"),
            (get(h, "/abcd"), "404"),
            (get(h, "/ABC"), "404"),
        ],
    );
}

#[test]
fn grpc_route_exact_method_matching() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: exact-matching, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{method: {service: gateway_api_conformance.echo_basic.grpcecho.GrpcEcho, method: Echo}}]
    backendRefs: [{name: grpc-infra-backend-v1, port: 8080}]
  - matches: [{method: {service: gateway_api_conformance.echo_basic.grpcecho.GrpcEcho, method: EchoTwo}}]
    backendRefs: [{name: grpc-infra-backend-v2, port: 8080}]
"#,
    );
    let call =
        |m: &str| req("POST", "gw.example", &format!("/gateway_api_conformance.echo_basic.grpcecho.GrpcEcho/{m}"), &[]);
    // 404 is what gRPC clients see as UNIMPLEMENTED.
    check(
        &g,
        "same-namespace",
        80,
        &[
            (call("Echo"), "grpc-infra-backend-v1"),
            (call("EchoTwo"), "grpc-infra-backend-v2"),
            (call("EchoThree"), "404"),
        ],
    );
}

#[test]
fn grpc_route_header_matching() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-header-matching, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{headers: [{name: version, value: one}]}]
    backendRefs: [{name: grpc-infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: version, value: two}]}]
    backendRefs: [{name: grpc-infra-backend-v2, port: 8080}]
  - matches: [{headers: [{name: version, value: two}, {name: color, value: orange}]}]
    backendRefs: [{name: grpc-infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: color, value: blue}]}, {headers: [{name: color, value: green}]}]
    backendRefs: [{name: grpc-infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: color, value: red}]}, {headers: [{name: color, value: yellow}]}]
    backendRefs: [{name: grpc-infra-backend-v2, port: 8080}]
"#,
    );
    let call =
        |h: &[(&str, &str)]| req("POST", "gw.example", "/gateway_api_conformance.echo_basic.grpcecho.GrpcEcho/Echo", h);
    check(
        &g,
        "same-namespace",
        80,
        &[
            (call(&[("Version", "one")]), "grpc-infra-backend-v1"),
            (call(&[("Version", "two")]), "grpc-infra-backend-v2"),
            (call(&[("Version", "two"), ("Color", "orange")]), "grpc-infra-backend-v1"),
            (call(&[("Version", "two"), ("Color", "blue")]), "grpc-infra-backend-v2"),
            (call(&[("Color", "orange")]), "404"),
            (call(&[("Some-Other-Header", "one")]), "404"),
            (call(&[("Color", "blue")]), "grpc-infra-backend-v1"),
            (call(&[("Color", "green")]), "grpc-infra-backend-v1"),
            (call(&[("Color", "red")]), "grpc-infra-backend-v2"),
            (call(&[("Color", "yellow")]), "grpc-infra-backend-v2"),
            (call(&[("Color", "purple")]), "404"),
        ],
    );
}

/// Not a conformance case: GRPCRoute precedence (service length, then method length).
#[test]
fn grpc_route_prefers_the_longer_service_then_the_longer_method() {
    let g = load_case(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-precedence, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{method: {method: Echo}}]
    backendRefs: [{name: grpc-infra-backend-v2, port: 8080}]
  - matches: [{method: {service: pkg.Svc}}]
    backendRefs: [{name: grpc-infra-backend-v1, port: 8080}]
  - matches: [{method: {type: RegularExpression, service: "other\\..*", method: "Oth.+"}}]
    backendRefs: [{name: grpc-infra-backend-v1, port: 8080}]
"#,
    );
    let call = |p: &str| req("POST", "gw.example", p, &[]);
    check(
        &g,
        "same-namespace",
        80,
        &[
            (call("/pkg.Svc/Echo"), "grpc-infra-backend-v1"),
            (call("/other.Svc/Echo"), "grpc-infra-backend-v2"),
            (call("/pkg.Svc/Other"), "grpc-infra-backend-v1"),
            (call("/other.Svc/Other"), "grpc-infra-backend-v1"),
            (call("/third.Svc/Other"), "404"),
        ],
    );
}
