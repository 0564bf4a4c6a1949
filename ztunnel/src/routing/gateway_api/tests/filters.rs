//! Filter, weight and timeout conformance cases: what is forwarded, answered or copied.
use super::*;

const H: &str = "gw.example";

/// An HTTPRoute on `same-namespace` with these rules (each forwarding to infra-backend-v1
/// unless it says otherwise).
fn route(rules: &str) -> GatewayRoutes {
    load_case(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: filters, namespace: gateway-conformance-infra}}\nspec:\n  parentRefs: [{{name: same-namespace}}]\n  rules:\n{rules}"
    ))
}

/// The header rules shared by several cases (`*-and-modify-headers`).
const MODIFY: &str = "{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}], add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}], remove: [X-Header-Remove]}}";

/// A path, the headers sent (or set by the backend), the headers expected.
type HeaderCase<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [(&'a str, &'a str)]);

const V1: &str = "backendRefs: [{name: infra-backend-v1, port: 8080}]";

#[test]
fn http_route_request_header_modifier() {
    let g = route(&format!(
        r#"
  - matches: [{{path: {{type: PathPrefix, value: /set}}}}]
    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: X-Header-Set, value: set-overwrites-values}}]}}}}]
    {V1}
  - matches: [{{path: {{type: PathPrefix, value: /add}}}}]
    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{add: [{{name: X-Header-Add, value: add-appends-values}}]}}}}]
    {V1}
  - matches: [{{path: {{type: PathPrefix, value: /remove}}}}]
    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{remove: [X-Header-Remove]}}}}]
    {V1}
  - matches: [{{path: {{type: PathPrefix, value: /multiple}}}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{{name: X-Header-Set-1, value: header-set-1}}, {{name: X-Header-Set-2, value: header-set-2}}]
        add: [{{name: X-Header-Add-1, value: header-add-1}}, {{name: X-Header-Add-2, value: header-add-2}}, {{name: X-Header-Add-3, value: header-add-3}}]
        remove: [X-Header-Remove-1, X-Header-Remove-2]
    {V1}
  - matches: [{{path: {{type: PathPrefix, value: /case-insensitivity}}}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{{name: X-Header-Set, value: header-set}}]
        add: [{{name: X-Header-Add, value: header-add}}]
        remove: [X-Header-Remove]
    {V1}
"#
    ));
    let cases: &[HeaderCase] = &[
        (
            "/set",
            &[("Some-Other-Header", "val")],
            &[("Some-Other-Header", "val"), ("X-Header-Set", "set-overwrites-values")],
        ),
        (
            "/set",
            &[("Some-Other-Header", "val"), ("X-Header-Set", "some-other-value")],
            &[("Some-Other-Header", "val"), ("X-Header-Set", "set-overwrites-values")],
        ),
        (
            "/add",
            &[("Some-Other-Header", "val")],
            &[("Some-Other-Header", "val"), ("X-Header-Add", "add-appends-values")],
        ),
        (
            "/add",
            &[("Some-Other-Header", "val"), ("X-Header-Add", "some-other-value")],
            &[("Some-Other-Header", "val"), ("X-Header-Add", "some-other-value,add-appends-values")],
        ),
        ("/remove", &[("X-Header-Remove", "val")], &[]),
        (
            "/multiple",
            &[
                ("X-Header-Set-2", "set-val-2"),
                ("X-Header-Add-2", "add-val-2"),
                ("X-Header-Remove-2", "remove-val-2"),
                ("Another-Header", "another-header-val"),
            ],
            &[
                ("X-Header-Set-1", "header-set-1"),
                ("X-Header-Set-2", "header-set-2"),
                ("X-Header-Add-1", "header-add-1"),
                ("X-Header-Add-2", "add-val-2,header-add-2"),
                ("X-Header-Add-3", "header-add-3"),
                ("Another-Header", "another-header-val"),
            ],
        ),
        (
            "/case-insensitivity",
            &[
                ("x-header-set", "original-val-set"),
                ("x-header-add", "original-val-add"),
                ("x-header-remove", "original-val-remove"),
                ("Another-Header", "another-header-val"),
            ],
            &[
                ("X-Header-Set", "header-set"),
                ("X-Header-Add", "original-val-add,header-add"),
                ("Another-Header", "another-header-val"),
            ],
        ),
    ];
    for (path, sent, want) in cases {
        let f = forwarded(&g, "same-namespace", &req("GET", H, path, sent));
        assert_eq!((f.backend.as_str(), f.headers), ("infra-backend-v1", headers(want)), "{path} {sent:?}");
    }
}

#[test]
fn http_route_response_header_modifier() {
    let g = route(&format!(
        r#"
  - matches: [{{path: {{type: PathPrefix, value: /set}}}}]
    filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: X-Header-Set, value: set-overwrites-values}}]}}}}]
    {V1}
  - matches: [{{path: {{type: PathPrefix, value: /add}}}}]
    filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{add: [{{name: X-Header-Add, value: add-appends-values}}]}}}}]
    {V1}
  - matches: [{{path: {{type: PathPrefix, value: /remove}}}}]
    filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{remove: [X-Header-Remove]}}}}]
    {V1}
  - matches: [{{path: {{type: PathPrefix, value: /case-insensitivity}}}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{{name: X-Header-Set, value: header-set}}]
        add:
        - {{name: X-Header-Add, value: header-add}}
        - {{name: x-lowercase-add, value: lowercase-add}}
        - {{name: x-Mixedcase-ADD-1, value: mixedcase-add-1}}
        - {{name: X-UPPERCASE-ADD, value: uppercase-add}}
        remove: [X-Header-Remove]
    {V1}
  - matches: [{{path: {{type: PathPrefix, value: /response-and-request-header-modifiers}}}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{{name: X-Header-Set-1, value: header-set-1}}]
        add: [{{name: X-Header-Add-2, value: header-add-2}}]
        remove: [X-Header-Remove-1]
    - {MODIFY}
    {V1}
"#
    ));
    let cases: &[HeaderCase] = &[
        (
            "/set",
            &[("Some-Other-Header", "val")],
            &[("Some-Other-Header", "val"), ("X-Header-Set", "set-overwrites-values")],
        ),
        (
            "/set",
            &[("Some-Other-Header", "val"), ("X-Header-Set", "some-other-value")],
            &[("Some-Other-Header", "val"), ("X-Header-Set", "set-overwrites-values")],
        ),
        (
            "/add",
            &[("Some-Other-Header", "val")],
            &[("Some-Other-Header", "val"), ("X-Header-Add", "add-appends-values")],
        ),
        (
            "/add",
            &[("Some-Other-Header", "val"), ("X-Header-Add", "some-other-value")],
            &[("Some-Other-Header", "val"), ("X-Header-Add", "some-other-value,add-appends-values")],
        ),
        ("/remove", &[("X-Header-Remove", "val")], &[]),
        (
            "/case-insensitivity",
            &[("x-header-set", "original-val-set"), ("x-header-add", "original-val-add"), ("x-header-remove", "v")],
            &[
                ("X-Header-Set", "header-set"),
                ("X-Header-Add", "original-val-add,header-add"),
                ("X-Lowercase-Add", "lowercase-add"),
                ("X-Mixedcase-Add-1", "mixedcase-add-1"),
                ("X-Uppercase-Add", "uppercase-add"),
            ],
        ),
        (
            "/response-and-request-header-modifiers",
            &[("X-Header-Add-2", "add-val-2"), ("X-Header-Remove-1", "remove-val-1"), ("X-Header-Echo", "echo")],
            &[
                ("X-Header-Set-1", "header-set-1"),
                ("X-Header-Add-2", "add-val-2,header-add-2"),
                ("X-Header-Echo", "echo"),
            ],
        ),
    ];
    for (path, from_backend, want) in cases {
        assert_eq!(response_headers(&g, &get(H, path), from_backend), headers(want), "{path}");
    }
    let both = forwarded(
        &g,
        "same-namespace",
        &req("GET", H, "/response-and-request-header-modifiers", &[("X-Header-Remove", "x")]),
    );
    assert_eq!(both.headers["x-header-set"], "set-overwrites-values", "the request filter applies too");
}

/// A rule redirecting `path` with the given `requestRedirect` body.
fn redirect(path: &str, body: &str) -> String {
    format!(
        "  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n    filters: [{{type: RequestRedirect, requestRedirect: {{{body}}}}}]\n    {V1}\n"
    )
}

#[test]
fn http_route_redirect_path() {
    let g = route(
        &[
            redirect("/original-prefix", "path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}"),
            redirect("/full", "path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}"),
            redirect(
                "/path-and-host",
                "hostname: example.org, path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}",
            ),
            redirect(
                "/path-and-status",
                "path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}, statusCode: 301",
            ),
            redirect(
                "/full-path-and-host",
                "hostname: example.org, path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}",
            ),
            redirect(
                "/full-path-and-status",
                "path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}, statusCode: 301",
            ),
        ]
        .concat(),
    );
    check(
        &g,
        "same-namespace",
        80,
        &[
            (get(H, "/original-prefix/lemon"), "302 http://gw.example/replacement-prefix/lemon"),
            (get(H, "/full/path/original"), "302 http://gw.example/full-path-replacement"),
            (get(H, "/path-and-host"), "302 http://example.org/replacement-prefix"),
            (get(H, "/path-and-status"), "301 http://gw.example/replacement-prefix"),
            (get(H, "/full-path-and-host"), "302 http://example.org/replacement-full"),
            (get(H, "/full-path-and-status"), "301 http://gw.example/replacement-full"),
        ],
    );
}

#[test]
fn http_route_redirect_host_and_status() {
    let g = route(
        &[
            redirect("/hostname-redirect", "hostname: example.org"),
            redirect("/host-and-status", "statusCode: 301, hostname: example.org"),
        ]
        .concat(),
    );
    check(
        &g,
        "same-namespace",
        80,
        &[
            (get(H, "/hostname-redirect"), "302 http://example.org/hostname-redirect"),
            (get(H, "/host-and-status"), "301 http://example.org/host-and-status"),
        ],
    );
}

#[test]
fn http_route_redirect_port() {
    let g = route(
        &[
            redirect("/port", "port: 8083"),
            redirect("/port-and-host", "hostname: example.org, port: 8083"),
            redirect("/port-and-status", "port: 8083, statusCode: 301"),
            redirect("/port-and-host-and-status", "port: 8083, hostname: example.org, statusCode: 302"),
        ]
        .concat(),
    );
    check(
        &g,
        "same-namespace",
        80,
        &[
            (get(H, "/port"), "302 http://gw.example:8083/port"),
            (get(H, "/port-and-host"), "302 http://example.org:8083/port-and-host"),
            (get(H, "/port-and-status"), "301 http://gw.example:8083/port-and-status"),
            (get(H, "/port-and-host-and-status"), "302 http://example.org:8083/port-and-host-and-status"),
        ],
    );
}

#[test]
fn http_route_redirect_scheme() {
    let g = route(
        &[
            redirect("/scheme", "scheme: https"),
            redirect("/scheme-and-host", "hostname: example.org, scheme: https"),
            redirect("/scheme-and-status", "scheme: https, statusCode: 301"),
            redirect("/scheme-and-host-and-status", "scheme: https, statusCode: 302, hostname: example.org"),
        ]
        .concat(),
    );
    check(
        &g,
        "same-namespace",
        80,
        &[
            (get(H, "/scheme"), "302 https://gw.example/scheme"),
            (get(H, "/scheme-and-host"), "302 https://example.org/scheme-and-host"),
            (get(H, "/scheme-and-status"), "301 https://gw.example/scheme-and-status"),
            (get(H, "/scheme-and-host-and-status"), "302 https://example.org/scheme-and-host-and-status"),
        ],
    );
}

#[test]
fn http_route_redirect_port_and_scheme() {
    let route_for = |name: &str, gw: &str, rules: &[String]| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: gateway-conformance-infra}}\nspec:\n  parentRefs: [{{name: {gw}}}]\n  rules:\n{}---\n",
            rules.concat()
        )
    };
    let host = |p: &str| format!("hostname: example.org{p}");
    let g = load_case(&format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: same-namespace-with-http-listener-on-8080, namespace: gateway-conformance-infra}}
spec:
  gatewayClassName: istio
  listeners: [{{name: http, port: 8080, protocol: HTTP, allowedRoutes: {{namespaces: {{from: Same}}}}}}]
---
{}{}{}"#,
        route_for(
            "http-route-for-listener-on-port-80",
            "same-namespace",
            &[
                redirect("/scheme-nil-and-port-nil", &host("")),
                redirect("/scheme-nil-and-port-80", &host(", port: 80")),
                redirect("/scheme-nil-and-port-8080", &host(", port: 8080")),
                redirect("/scheme-https-and-port-nil", &host(", scheme: https")),
                redirect("/scheme-https-and-port-443", &host(", scheme: https, port: 443")),
                redirect("/scheme-https-and-port-8443", &host(", scheme: https, port: 8443")),
            ]
        ),
        route_for(
            "http-route-for-listener-on-port-8080",
            "same-namespace-with-http-listener-on-8080",
            &[
                redirect("/scheme-nil-and-port-nil", &host("")),
                redirect("/scheme-nil-and-port-80", &host(", port: 80")),
                redirect("/scheme-https-and-port-nil", &host(", scheme: https")),
            ]
        ),
        route_for(
            "http-route-for-listener-on-port-443",
            "same-namespace-with-https-listener",
            &[
                redirect("/scheme-nil-and-port-nil", &host("")),
                redirect("/scheme-nil-and-port-443", &host(", port: 443")),
                redirect("/scheme-nil-and-port-8443", &host(", port: 8443")),
                redirect("/scheme-http-and-port-nil", &host(", scheme: http")),
                redirect("/scheme-http-and-port-80", &host(", scheme: http, port: 80")),
                redirect("/scheme-http-and-port-8080", &host(", scheme: http, port: 8080")),
            ]
        ),
    ));
    check(
        &g,
        "same-namespace",
        80,
        &[
            (get(H, "/scheme-nil-and-port-nil"), "302 http://example.org/scheme-nil-and-port-nil"),
            (get(H, "/scheme-nil-and-port-80"), "302 http://example.org/scheme-nil-and-port-80"),
            (get(H, "/scheme-nil-and-port-8080"), "302 http://example.org:8080/scheme-nil-and-port-8080"),
            (get(H, "/scheme-https-and-port-nil"), "302 https://example.org/scheme-https-and-port-nil"),
            (get(H, "/scheme-https-and-port-443"), "302 https://example.org/scheme-https-and-port-443"),
            (get(H, "/scheme-https-and-port-8443"), "302 https://example.org:8443/scheme-https-and-port-8443"),
        ],
    );
    check(
        &g,
        "same-namespace-with-http-listener-on-8080",
        8080,
        &[
            (get(H, "/scheme-nil-and-port-nil"), "302 http://example.org:8080/scheme-nil-and-port-nil"),
            (get(H, "/scheme-nil-and-port-80"), "302 http://example.org/scheme-nil-and-port-80"),
            (get(H, "/scheme-https-and-port-nil"), "302 https://example.org/scheme-https-and-port-nil"),
        ],
    );
    let https = |p: &str| Request { scheme: "https".into(), ..get(H, p) };
    check(
        &g,
        "same-namespace-with-https-listener",
        443,
        &[
            (https("/scheme-nil-and-port-nil"), "302 https://example.org/scheme-nil-and-port-nil"),
            (https("/scheme-nil-and-port-443"), "302 https://example.org/scheme-nil-and-port-443"),
            (https("/scheme-nil-and-port-8443"), "302 https://example.org:8443/scheme-nil-and-port-8443"),
            (https("/scheme-http-and-port-nil"), "302 http://example.org/scheme-http-and-port-nil"),
            (https("/scheme-http-and-port-80"), "302 http://example.org/scheme-http-and-port-80"),
            (https("/scheme-http-and-port-8080"), "302 http://example.org:8080/scheme-http-and-port-8080"),
        ],
    );
}

/// A rule rewriting `path` with the given `urlRewrite` body, and more filters.
fn rewrite(path: &str, body: &str, more: &str, backend: &str) -> String {
    format!(
        "  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n    filters: [{{type: URLRewrite, urlRewrite: {{{body}}}}}{more}]\n    backendRefs: [{{name: {backend}, port: 8080}}]\n"
    )
}

#[test]
fn http_route_rewrite_path() {
    let g = route(
        &[
            rewrite(
                "/prefix/one",
                "path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}",
                "",
                "infra-backend-v1",
            ),
            rewrite("/strip-prefix", "path: {type: ReplacePrefixMatch, replacePrefixMatch: /}", "", "infra-backend-v1"),
            rewrite("/full/one", "path: {type: ReplaceFullPath, replaceFullPath: /one}", "", "infra-backend-v1"),
            rewrite(
                "/full/rewrite-path-and-modify-headers",
                "path: {type: ReplaceFullPath, replaceFullPath: /test}",
                &format!(", {MODIFY}"),
                "infra-backend-v1",
            ),
            rewrite(
                "/prefix/rewrite-path-and-modify-headers",
                "path: {type: ReplacePrefixMatch, replacePrefixMatch: /prefix}",
                &format!(", {MODIFY}"),
                "infra-backend-v1",
            ),
        ]
        .concat(),
    );
    for (path, want) in [
        ("/prefix/one/two", "/one/two"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/full/one/two", "/one"),
        ("/full/rewrite-path-and-modify-headers/test", "/test"),
        ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
    ] {
        let f = forwarded(&g, "same-namespace", &get(H, path));
        assert_eq!((f.backend.as_str(), f.path.as_str()), ("infra-backend-v1", want), "{path}");
    }
    let sent =
        [("X-Header-Remove", "remove-val"), ("X-Header-Add-Append", "append-val-1"), ("X-Header-Set", "set-val")];
    let want = headers(&[
        ("X-Header-Add", "header-val-1"),
        ("X-Header-Add-Append", "append-val-1,header-val-2"),
        ("X-Header-Set", "set-overwrites-values"),
    ]);
    for path in ["/full/rewrite-path-and-modify-headers/test", "/prefix/rewrite-path-and-modify-headers/one"] {
        assert_eq!(forwarded(&g, "same-namespace", &req("GET", H, path, &sent)).headers, want, "{path}");
    }
}

/// Not a conformance case: the spec's ReplacePrefixMatch table, for a rewrite and a
/// redirect, with the query string kept.
#[test]
fn replace_prefix_match_follows_the_spec_table() {
    let table = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
    ];
    for (path, prefix, with, want) in table {
        let g = route(
            &[
                rewrite(
                    prefix,
                    &format!("path: {{type: ReplacePrefixMatch, replacePrefixMatch: \"{with}\"}}"),
                    "",
                    "infra-backend-v1",
                ),
                redirect(
                    &format!("/r{prefix}"),
                    &format!("path: {{type: ReplacePrefixMatch, replacePrefixMatch: \"{with}\"}}"),
                ),
            ]
            .concat(),
        );
        let f = forwarded(&g, "same-namespace", &get(H, &format!("{path}?q=1")));
        assert_eq!(f.path, format!("{want}?q=1"), "rewrite {path} {prefix} {with}");
        let r = at(&g, "same-namespace", 80, &get(H, &format!("/r{path}?q=1")));
        assert_eq!(r, format!("302 http://gw.example{want}?q=1"), "redirect {path} {prefix} {with}");
    }
}

#[test]
fn http_route_rewrite_host() {
    let g = load_case(&format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: rewrite-host, namespace: gateway-conformance-infra}}
spec:
  parentRefs: [{{name: same-namespace}}]
  hostnames: [rewrite.example]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /one}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{hostname: one.example.org}}}}]
    backendRefs: [{{name: infra-backend-v1, port: 8080}}]
  - filters: [{{type: URLRewrite, urlRewrite: {{hostname: example.org}}}}]
    backendRefs: [{{name: infra-backend-v2, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /rewrite-host-and-modify-headers}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{hostname: test.example.org}}}}, {MODIFY}]
    backendRefs: [{{name: infra-backend-v2, port: 8080}}]
"#
    ));
    let at =
        |path: &str, sent: &[(&str, &str)]| forwarded(&g, "same-namespace", &req("GET", "rewrite.example", path, sent));
    let one = at("/one", &[]);
    assert_eq!(
        (one.backend.as_str(), one.path.as_str(), one.authority.as_str()),
        ("infra-backend-v1", "/one", "one.example.org")
    );
    let two = at("/two", &[]);
    assert_eq!(
        (two.backend.as_str(), two.path.as_str(), two.authority.as_str()),
        ("infra-backend-v2", "/two", "example.org")
    );
    let three = at(
        "/rewrite-host-and-modify-headers",
        &[("X-Header-Remove", "remove-val"), ("X-Header-Add-Append", "append-val-1")],
    );
    assert_eq!((three.backend.as_str(), three.authority.as_str()), ("infra-backend-v2", "test.example.org"));
    assert_eq!(
        three.headers,
        headers(&[
            ("X-Header-Add", "header-val-1"),
            ("X-Header-Add-Append", "append-val-1,header-val-2"),
            ("X-Header-Set", "set-overwrites-values")
        ])
    );
}

/// The mirror targets (backend name, percent) of the rule `path` reaches.
fn mirrors(g: &GatewayRoutes, path: &str) -> Vec<(String, f64)> {
    let p = g.for_gateway(INFRA, "same-namespace", 80, H).unwrap();
    let rule = p.router.rule(p.decide(&get(H, path), 0).rule()).unwrap();
    rule.mirrors.iter().map(|(d, pct)| (d.host.split('.').next().unwrap().to_string(), *pct)).collect()
}

fn mirror(name: &str, extra: &str) -> String {
    format!("{{type: RequestMirror, requestMirror: {{backendRef: {{name: {name}, namespace: gateway-conformance-infra, port: 8080}}{extra}}}}}")
}

#[test]
fn http_route_request_mirror() {
    let g = route(&format!(
        "  - matches: [{{path: {{type: PathPrefix, value: /mirror}}}}]\n    filters: [{}]\n    {V1}\n  - matches: [{{path: {{type: PathPrefix, value: /mirror-and-modify-headers}}}}]\n    filters: [{MODIFY}, {}]\n    {V1}\n",
        mirror("infra-backend-v2", ""),
        mirror("infra-backend-v2", "")
    ));
    assert_eq!(mirrors(&g, "/mirror"), vec![("infra-backend-v2".to_string(), 100.0)]);
    assert_eq!(forwarded(&g, "same-namespace", &get(H, "/mirror")).backend, "infra-backend-v1");
    assert_eq!(mirrors(&g, "/mirror-and-modify-headers"), vec![("infra-backend-v2".to_string(), 100.0)]);
    let f = forwarded(&g, "same-namespace", &req("GET", H, "/mirror-and-modify-headers", &[("X-Header-Remove", "x")]));
    assert_eq!(f.headers["x-header-set"], "set-overwrites-values");
}

#[test]
fn http_route_request_multiple_mirrors() {
    let g = route(&format!(
        "  - matches: [{{path: {{type: PathPrefix, value: /multi-mirror}}}}]\n    filters: [{}, {}]\n    {V1}\n",
        mirror("infra-backend-v2", ""),
        mirror("infra-backend-v3", "")
    ));
    assert_eq!(
        mirrors(&g, "/multi-mirror"),
        vec![("infra-backend-v2".to_string(), 100.0), ("infra-backend-v3".to_string(), 100.0)]
    );
}

#[test]
fn http_route_request_percentage_mirror() {
    let g = route(&format!(
        "  - matches: [{{path: {{type: PathPrefix, value: /percent-mirror}}}}]\n    filters: [{}]\n    {V1}\n  - matches: [{{path: {{type: PathPrefix, value: /percent-mirror-fraction}}}}]\n    filters: [{}]\n    {V1}\n",
        mirror("infra-backend-v2", ", percent: 20"),
        mirror("infra-backend-v2", ", fraction: {numerator: 25, denominator: 50}")
    ));
    assert_eq!(mirrors(&g, "/percent-mirror"), vec![("infra-backend-v2".to_string(), 20.0)]);
    assert_eq!(mirrors(&g, "/percent-mirror-fraction"), vec![("infra-backend-v2".to_string(), 50.0)]);
}

/// How many of `n` seeded rolls go to each backend of `path`.
fn distribution(g: &GatewayRoutes, path: &str, n: u32) -> BTreeMap<String, u32> {
    let p = g.for_gateway(INFRA, "same-namespace", 80, H).unwrap();
    let mut rng = fastrand::Rng::with_seed(0x6a7e);
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let who = match p.decide(&get(H, path), rng.u32(..)) {
            Decision::Forward { destination, .. } => destination.host.split('.').next().unwrap().to_string(),
            other => format!("{other:?}"),
        };
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}

#[test]
fn http_route_weight() {
    let g = route(
        "  - backendRefs:\n    - {name: infra-backend-v1, port: 8080, weight: 70}\n    - {name: infra-backend-v2, port: 8080, weight: 30}\n    - {name: infra-backend-v3, port: 8080, weight: 0}\n",
    );
    let n = 2000;
    let seen = distribution(&g, "/", n);
    assert_eq!(seen.keys().collect::<Vec<_>>(), vec!["infra-backend-v1", "infra-backend-v2"], "weight 0 gets nothing");
    for (backend, want) in [("infra-backend-v1", 0.7), ("infra-backend-v2", 0.3)] {
        let got = f64::from(seen[backend]) / f64::from(n);
        assert!((got - want).abs() <= 0.05, "{backend}: {got} is not within 5% of {want}");
    }
}

#[test]
fn http_route_request_header_modifier_backend_weights() {
    let g = route(
        r#"
  - backendRefs:
    - name: infra-backend-v1
      port: 8080
      weight: 10
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: Backend, value: infra-backend-v1}]}}]
    - name: infra-backend-v2
      port: 8080
      weight: 10
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: Backend, value: infra-backend-v2}]}}]
"#,
    );
    let p = g.for_gateway(INFRA, "same-namespace", 80, H).unwrap();
    for roll in [0, 15] {
        match p.decide(&get(H, "/"), roll) {
            Decision::Forward { destination, headers: Some(h), .. } => {
                let set = &h.request.as_ref().unwrap().set;
                assert_eq!(set["backend"], destination.host.split('.').next().unwrap(), "roll {roll}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn http_route_omitted_backend_refs() {
    let g = route(
        r#"
  - matches: [{path: {type: Exact, value: /omitted-no-forward}}]
  - matches: [{path: {type: Exact, value: /empty-no-forward}}]
    backendRefs: []
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
"#,
    );
    check(
        &g,
        "same-namespace",
        80,
        &[
            (get(H, "/forward"), "infra-backend-v1"),
            (get(H, "/omitted-no-forward"), "500"),
            (get(H, "/empty-no-forward"), "500"),
        ],
    );
    assert_eq!(
        condition(&g, RouteKind::Http, INFRA, "filters", ConditionType::ResolvedRefs),
        (true, Reason::ResolvedRefs)
    );
}

#[test]
fn http_route_timeout_request_and_backend_request() {
    let g = route(
        r#"
  - matches: [{path: {type: PathPrefix, value: /request-timeout}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
    timeouts: {request: 500ms}
  - matches: [{path: {type: PathPrefix, value: /disable-request-timeout}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
    timeouts: {request: 0s}
  - matches: [{path: {type: PathPrefix, value: /backend-timeout}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
    timeouts: {request: 1m30s, backendRequest: 1s}
"#,
    );
    let p = g.for_gateway(INFRA, "same-namespace", 80, H).unwrap();
    let rule = |path: &str| p.router.rule(p.decide(&get(H, path), 0).rule()).unwrap().clone();
    assert_eq!(rule("/request-timeout").timeout, Some(std::time::Duration::from_millis(500)));
    assert_eq!(rule("/disable-request-timeout").timeout, None, "0s turns the timeout off");
    let both = rule("/backend-timeout");
    assert_eq!(both.timeout, Some(std::time::Duration::from_secs(90)));
    assert_eq!(both.retries.per_try_timeout, Some(std::time::Duration::from_secs(1)));
}
