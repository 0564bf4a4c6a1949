//! Table tests of the waypoint's L7 policy and its configuration loading: each case is one
//! way around a policy that must not work.
use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};

use super::authz::{self, L7Policy, RequestFacts};
use super::routes::{RouteTable, Routes};
use crate::metrics::Metrics;

fn docs(text: &str) -> Vec<serde_yaml_ng::Value> {
    serde_yaml_ng::Deserializer::from_str(text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
}

fn policy(action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: default}}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: reviews}}]\n  action: {action}\n  rules:\n{rules}"
    )
}

fn compiled(text: &str) -> Result<L7Policy, String> {
    let ap = serde_yaml_ng::from_value(docs(text).remove(0)).map_err(|e| e.to_string())?;
    authz::compile(&ap, "default").map(|p| p.expect("targeted"))
}

struct Req<'a> {
    principal: &'a str,
    method: &'a str,
    path: &'a str,
    host: &'a str,
    headers: HeaderMap,
    http: bool,
}

impl Default for Req<'_> {
    fn default() -> Self {
        Req {
            principal: "cluster.local/ns/default/sa/client",
            method: "GET",
            path: "/",
            host: "reviews",
            headers: HeaderMap::new(),
            http: true,
        }
    }
}

fn decide(p: &L7Policy, r: &Req<'_>) -> Result<(), String> {
    let f = RequestFacts {
        principal: Some(r.principal),
        namespace: Some("default"),
        source_ip: IpAddr::from([10, 0, 0, 1]),
        method: r.method,
        path: r.path,
        host: r.host,
        port: 9080,
        headers: &r.headers,
        http: r.http,
    };
    authz::evaluate(std::iter::once(p), false, ("default", "reviews"), ("default", "waypoint"), &f)
}

#[test]
fn deny_by_a_short_service_account_name_denies_that_account() {
    let p = compiled(&policy("DENY", "  - from:\n    - source:\n        serviceAccounts: [client]\n")).unwrap();
    assert!(decide(&p, &Req::default()).is_err());
    assert!(decide(&p, &Req { principal: "cluster.local/ns/default/sa/other", ..Default::default() }).is_ok());
}

#[test]
fn a_wildcard_in_the_middle_is_rejected_not_silently_unmatched() {
    let e = compiled(&policy("DENY", "  - from:\n    - source:\n        principals: [\"*/ns/x/sa/*\"]\n")).unwrap_err();
    assert!(e.contains("prefix, a suffix or the whole value"), "{e}");
}

#[test]
fn a_target_in_another_namespace_is_rejected() {
    let text = policy("ALLOW", "  - {}\n").replace("name: reviews}", "name: reviews, namespace: other}");
    assert!(compiled(&text).unwrap_err().contains("its own namespace"));
}

#[test]
fn a_deny_on_a_header_sees_every_value_and_non_utf8_ones() {
    let p =
        compiled(&policy("DENY", "  - when:\n    - key: request.headers[x-debug]\n      values: [\"on\"]\n")).unwrap();
    let mut two = HeaderMap::new();
    two.append("x-debug", HeaderValue::from_static("off"));
    two.append("x-debug", HeaderValue::from_static("on"));
    assert!(decide(&p, &Req { headers: two, ..Default::default() }).is_err(), "second header line");
    let any =
        compiled(&policy("DENY", "  - when:\n    - key: request.headers[x-debug]\n      values: [\"*\"]\n")).unwrap();
    let mut raw = HeaderMap::new();
    raw.insert("x-debug", HeaderValue::from_bytes(b"\xff").unwrap());
    assert!(decide(&any, &Req { headers: raw, ..Default::default() }).is_err(), "non-UTF-8 value");
}

#[test]
fn methods_and_hosts_match_however_the_client_spells_them() {
    let p = compiled(&policy("DENY", "  - to:\n    - operation:\n        methods: [DELETE]\n")).unwrap();
    assert!(decide(&p, &Req { method: "delete", ..Default::default() }).is_err());
    let h = compiled(&policy("DENY", "  - to:\n    - operation:\n        hosts: [admin.default.svc.cluster.local]\n"))
        .unwrap();
    for host in [
        "admin.default.svc.cluster.local.",
        "u@admin.default.svc.cluster.local:9080",
        "ADMIN.default.svc.cluster.local",
    ] {
        assert!(decide(&h, &Req { host, ..Default::default() }).is_err(), "{host}");
    }
}

#[test]
fn over_raw_tcp_an_allow_needing_http_fields_never_matches_and_a_deny_matches_more() {
    let allow = compiled(&policy("ALLOW", "  - to:\n    - operation:\n        methods: [GET]\n")).unwrap();
    assert!(decide(&allow, &Req { http: false, method: "", ..Default::default() }).is_err());
    let deny = compiled(&policy("DENY", "  - to:\n    - operation:\n        paths: [\"/admin\"]\n")).unwrap();
    assert!(decide(&deny, &Req { http: false, method: "", path: "", ..Default::default() }).is_err());
}

#[test]
fn a_misspelt_policy_field_rejects_the_policy_and_denies_its_target() {
    let text = policy("ALLOW", "  - to:\n    - operation:\n        path: [\"/public\"]\n");
    let table = RouteTable::load(&docs(&text), &RouteTable::default());
    assert_eq!(table.rejected.len(), 1, "{:?}", table.rejected);
    assert!(table.poisoned_for(("default", "reviews"), ("default", "waypoint")));
    assert!(!table.poisoned_for(("default", "ratings"), ("default", "other")));
}

#[test]
fn a_rejected_policy_with_a_valid_earlier_version_keeps_that_version() {
    let good = RouteTable::load(
        &docs(&policy("DENY", "  - to:\n    - operation:\n        paths: [\"/admin\"]\n")),
        &RouteTable::default(),
    );
    let bad =
        RouteTable::load(&docs(&policy("DENY", "  - to:\n    - operation:\n        paths: [\"/a*b*\"]\n")), &good);
    assert_eq!(bad.rejected.len(), 1);
    assert!(bad.policies.contains_key("default/p"), "the earlier version stays");
    assert!(!bad.poisoned_for(("default", "reviews"), ("default", "waypoint")));
}

#[test]
fn an_unreadable_routes_file_keeps_the_last_good_config_or_denies_all_before_one() {
    let dir = std::env::temp_dir().join(format!("wp-routes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let metrics = Metrics::new();
    let routes = Routes::default();
    std::fs::write(dir.join("p.yaml"), "kind: [unclosed").unwrap();
    routes.reload(&dir, &metrics);
    assert!(routes.table().poisoned_for(("default", "reviews"), ("default", "waypoint")), "no good read yet: deny");
    std::fs::write(dir.join("p.yaml"), policy("DENY", "  - {}\n")).unwrap();
    routes.reload(&dir, &metrics);
    assert!(routes.table().policies.contains_key("default/p"));
    std::fs::write(dir.join("p.yaml"), "kind: [half-writ").unwrap();
    routes.reload(&dir, &metrics);
    assert!(routes.table().policies.contains_key("default/p"), "the DENY stays in force");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_virtual_service_of_another_namespace_does_not_route_the_service() {
    let vs = |ns: &str| {
        format!("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: {ns}}}\nspec:\n  hosts: [\"*\"]\n  http:\n  - route:\n    - destination: {{host: reviews}}\n")
    };
    let svc = crate::state::Service {
        name: "reviews".into(),
        namespace: "default".into(),
        hostname: "reviews.default.svc.cluster.local".into(),
        vips: vec![],
        ports: Default::default(),
        subject_alt_names: vec![],
        waypoint: None,
    };
    assert!(RouteTable::load(&docs(&vs("attacker")), &RouteTable::default()).router_for(&svc).is_none());
    assert!(RouteTable::load(&docs(&vs("default")), &RouteTable::default()).router_for(&svc).is_some());
}
