//! AuthorizationPolicy and PeerAuthentication translation, checked both on the produced policies and on what the
//! data plane's policy engine decides with them.
use super::*;
use crate::controller::authz::STATIC_STRICT_POLICY;
use crate::policy::{Cidr, Match, PolicyAction, PolicyScope, ServiceAccountMatch, StringMatch};

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/bookinfo/sa/sa-productpage";
const OTHER: &str = "spiffe://cluster.local/ns/other/sa/sa-x";

/// Namespace `bookinfo` (ambient) with two pods, `reviews` (app=reviews) and `ratings` (app=ratings), plus `extra`.
fn mesh(extra: &str) -> Model {
    let text = namespace("bookinfo", &[("istio.io/dataplane-mode", "ambient")])
        + &pod("bookinfo", "reviews", "10.0.0.1", &[("app", "reviews")])
        + &pod("bookinfo", "ratings", "10.0.0.2", &[("app", "ratings")])
        + extra;
    build(&text)
}

/// An AuthorizationPolicy; `spec` is YAML (indented or not).
fn policy(namespace: &str, name: &str, spec: &str) -> String {
    object("security.istio.io/v1", "AuthorizationPolicy", namespace, name, spec)
}

/// A namespaced object with a `spec`, written as YAML (indented or not).
fn object(api_version: &str, kind: &str, namespace: &str, name: &str, spec: &str) -> String {
    let spec: String = yaml(spec).lines().map(|l| format!("  {l}\n")).collect();
    let metadata = format!("metadata:\n  name: {name}\n  namespace: {namespace}\n");
    format!("---\napiVersion: {api_version}\nkind: {kind}\n{metadata}spec:\n{spec}")
}

fn allowed(m: &Model, pod: &str, source: Option<&str>, source_ip: &str, port: u16) -> bool {
    decide(m, workload(m, "bookinfo", pod), source, source_ip, port).allowed()
}

#[test]
fn allow_policy_translates_principals_namespaces_and_ports() {
    let spec = r#"
        selector: {matchLabels: {app: reviews}}
        rules:
        - from:
          - source:
              principals: [cluster.local/ns/bookinfo/sa/sa-productpage]
              namespaces: [bookinfo]
          to:
          - operation: {ports: ["9080"], notPorts: ["9081"]}
    "#;
    let m = mesh(&policy("bookinfo", "p", spec));
    assert_no_errors(&m);
    let p = &m.authorizations["bookinfo/p"];
    assert_eq!((p.scope, p.action), (PolicyScope::WorkloadSelector, PolicyAction::Allow));
    let to = Match { destination_ports: vec![9080], not_destination_ports: vec![9081], ..Match::default() };
    let from = Match {
        principals: vec![StringMatch::Exact("cluster.local/ns/bookinfo/sa/sa-productpage".into())],
        namespaces: vec![StringMatch::Exact("bookinfo".into())],
        ..Match::default()
    };
    assert_eq!(p.rules, vec![vec![vec![to], vec![from]]], "to clause, then from clause");
    assert!(allowed(&m, "reviews", Some(PRODUCTPAGE), "10.0.0.9", 9080));
    assert!(!allowed(&m, "reviews", Some(PRODUCTPAGE), "10.0.0.9", 9090), "other port");
    assert!(!allowed(&m, "reviews", Some(OTHER), "10.0.0.9", 9080), "other identity");
    assert!(allowed(&m, "ratings", Some(OTHER), "10.0.0.9", 9080), "not selected");
}

#[test]
fn ip_blocks_and_service_accounts_translate() {
    let spec = "
        rules:
        - from:
          - source:
              ipBlocks: [10.1.0.0/16, 10.2.0.1]
              notIpBlocks: [10.1.2.0/24]
              serviceAccounts: [sa-productpage, other/sa-x]
    ";
    let m = mesh(&policy("bookinfo", "p", spec));
    let from = &m.authorizations["bookinfo/p"].rules[0][0][0];
    assert_eq!(from.source_ips, vec!["10.1.0.0/16".parse::<Cidr>().unwrap(), "10.2.0.1/32".parse().unwrap()]);
    assert_eq!(from.not_source_ips, vec!["10.1.2.0/24".parse::<Cidr>().unwrap()]);
    let sa = |ns: &str, sa: &str| ServiceAccountMatch { namespace: ns.into(), service_account: sa.into() };
    assert_eq!(from.service_accounts, vec![sa("bookinfo", "sa-productpage"), sa("other", "sa-x")]);
    assert!(allowed(&m, "reviews", Some(PRODUCTPAGE), "10.1.0.5", 80));
    assert!(!allowed(&m, "reviews", Some(PRODUCTPAGE), "10.1.2.5", 80), "notIpBlocks");
    assert!(!allowed(&m, "reviews", Some(PRODUCTPAGE), "10.3.0.1", 80), "outside ipBlocks");
}

#[test]
fn deny_action_denies_matching_connections() {
    let spec = "
        action: DENY
        rules:
        - from:
          - source: {namespaces: [other]}
    ";
    let m = mesh(&policy("bookinfo", "p", spec));
    assert_eq!(m.authorizations["bookinfo/p"].action, PolicyAction::Deny);
    assert!(!allowed(&m, "reviews", Some(OTHER), "10.0.0.9", 80));
    assert!(allowed(&m, "reviews", Some(PRODUCTPAGE), "10.0.0.9", 80));
}

#[test]
fn selector_scope_is_listed_only_by_matching_workloads() {
    let m =
        mesh(&policy("bookinfo", "p", "  selector: {matchLabels: {app: reviews}}\n  action: DENY\n  rules: [{}]\n"));
    assert_eq!(workload(&m, "bookinfo", "reviews").authorization_policies, ["bookinfo/p"]);
    assert!(workload(&m, "bookinfo", "ratings").authorization_policies.is_empty());
    assert!(!allowed(&m, "reviews", Some(PRODUCTPAGE), "10.0.0.9", 80));
    assert!(allowed(&m, "ratings", Some(PRODUCTPAGE), "10.0.0.9", 80));
}

#[test]
fn policy_without_selector_has_namespace_scope() {
    let m = mesh(&(policy("bookinfo", "p", "  action: DENY\n  rules: [{}]\n") + &pod("other", "x", "10.0.1.1", &[])));
    assert_eq!(m.authorizations["bookinfo/p"].scope, PolicyScope::Namespace);
    assert!(workload(&m, "bookinfo", "ratings").authorization_policies.is_empty(), "not listed: scope says it");
    assert!(!allowed(&m, "ratings", Some(PRODUCTPAGE), "10.0.0.9", 80));
    assert!(decide(&m, workload(&m, "other", "x"), None, "10.0.0.9", 80).allowed());
}

#[test]
fn policy_in_root_namespace_is_global() {
    let m = mesh(&policy("istio-system", "p", "  action: DENY\n  rules: [{}]\n"));
    assert_eq!(m.authorizations["istio-system/p"].scope, PolicyScope::Global);
    assert!(!allowed(&m, "ratings", Some(PRODUCTPAGE), "10.0.0.9", 80));
}

#[test]
fn root_namespace_selector_policy_selects_in_every_namespace() {
    let m = mesh(&policy("istio-system", "p", "  selector: {matchLabels: {app: ratings}}\n  rules: [{}]\n"));
    assert_eq!(workload(&m, "bookinfo", "ratings").authorization_policies, ["istio-system/p"]);
}

#[test]
fn when_conditions_translate_to_one_clause_each() {
    let spec = r#"
        rules:
        - when:
          - {key: source.ip, values: [10.0.0.0/8]}
          - {key: destination.port, notValues: ["22"]}
          - {key: source.namespace, values: [bookinfo]}
    "#;
    let m = mesh(&policy("bookinfo", "p", spec));
    assert_no_errors(&m);
    let rule = &m.authorizations["bookinfo/p"].rules[0];
    assert_eq!(rule.len(), 3);
    assert_eq!(rule[1], vec![Match { not_destination_ports: vec![22], ..Match::default() }]);
    assert!(allowed(&m, "reviews", Some(PRODUCTPAGE), "10.9.9.9", 80));
    assert!(!allowed(&m, "reviews", Some(PRODUCTPAGE), "10.9.9.9", 22));
    assert!(!allowed(&m, "reviews", Some(OTHER), "10.9.9.9", 80));
}

#[test]
fn http_fields_make_an_allow_rule_match_nothing() {
    let spec = r#"
        selector: {matchLabels: {app: reviews}}
        action: ALLOW
        rules:
        - to: [{operation: {methods: [GET], ports: ["9080"]}}]
        - from: [{source: {namespaces: [other]}}]
    "#;
    let m = mesh(&policy("bookinfo", "p", spec));
    let rules = &m.authorizations["bookinfo/p"].rules;
    assert_eq!(rules.len(), 1, "the rule with `methods` is dropped, the L4 rule stays");
    assert!(!allowed(&m, "reviews", Some(PRODUCTPAGE), "10.0.0.9", 9080), "GET on 9080 is not allowed by ztunnel");
    assert!(allowed(&m, "reviews", Some(OTHER), "10.0.0.9", 9080));
    let Outcome::Warning(w) = outcome(&m, "AuthorizationPolicy", "bookinfo", "p") else { panic!("no warning") };
    assert!(w.contains("found: methods") && w.contains("rules matching HTTP attributes are omitted"), "{w}");
}

#[test]
fn http_fields_broaden_a_deny_rule_to_its_l4_part() {
    let spec = r#"
        action: DENY
        rules:
        - to: [{operation: {methods: [POST], ports: ["9080"]}}]
    "#;
    let m = mesh(&policy("bookinfo", "p", spec));
    assert_eq!(
        m.authorizations["bookinfo/p"].rules,
        vec![vec![vec![Match { destination_ports: vec![9080], ..Match::default() }]]]
    );
    assert!(!allowed(&m, "reviews", Some(PRODUCTPAGE), "10.0.0.9", 9080), "every method on 9080 is denied");
    assert!(allowed(&m, "reviews", Some(PRODUCTPAGE), "10.0.0.9", 9090));
    let Outcome::Warning(w) = outcome(&m, "AuthorizationPolicy", "bookinfo", "p") else { panic!("no warning") };
    assert!(w.contains("enforced without the HTTP rules"), "{w}");
}

#[test]
fn deny_with_only_http_fields_has_no_effect() {
    let spec = "
        action: DENY
        rules:
        - to: [{operation: {paths: [/admin]}}]
          when: [{key: 'request.headers[x-user]', values: [bob]}]
    ";
    let m = mesh(&policy("bookinfo", "p", spec));
    assert!(allowed(&m, "reviews", Some(PRODUCTPAGE), "10.0.0.9", 9080));
    let Outcome::Warning(w) = outcome(&m, "AuthorizationPolicy", "bookinfo", "p") else { panic!("no warning") };
    assert!(w.contains("found: paths, request.headers") && w.contains("will have no effect"), "{w}");
}

#[test]
fn custom_and_audit_actions_are_rejected_with_reason() {
    let text = policy("bookinfo", "ext", "  action: CUSTOM\n  provider: {name: opa}\n  rules: [{}]\n")
        + &policy("bookinfo", "audit", "  action: AUDIT\n  rules: [{}]\n");
    let m = mesh(&text);
    assert_eq!(
        outcome(&m, "AuthorizationPolicy", "bookinfo", "ext"),
        Outcome::Error("ztunnel does not support the CUSTOM action".into())
    );
    assert!(
        matches!(outcome(&m, "AuthorizationPolicy", "bookinfo", "audit"), Outcome::Error(r) if r.contains("AUDIT"))
    );
    assert!(m.authorizations.is_empty());
}

#[test]
fn invalid_values_reject_the_policy_with_their_path() {
    let m = mesh(&policy("bookinfo", "p", "  rules:\n  - to: [{operation: {ports: [http]}}]\n"));
    assert_eq!(
        outcome(&m, "AuthorizationPolicy", "bookinfo", "p"),
        Outcome::Error("rules[0].to[0].operation.ports: invalid port \"http\"".into())
    );
    let m = mesh(&policy("bookinfo", "q", "  rules:\n  - from: [{source: {ipBlocks: [10.0.0.0/33]}}]\n"));
    assert!(matches!(outcome(&m, "AuthorizationPolicy", "bookinfo", "q"), Outcome::Error(r) if r.contains("ipBlocks")));
}

#[test]
fn target_ref_policy_is_left_to_the_waypoint() {
    let spec = r#"
        targetRefs: [{kind: Service, group: "", name: reviews}]
        rules: [{to: [{operation: {methods: [GET]}}]}]
    "#;
    let m = mesh(&policy("bookinfo", "p", spec));
    assert_eq!(outcome(&m, "AuthorizationPolicy", "bookinfo", "p"), Outcome::Ok);
    assert!(m.authorizations.is_empty());
    assert!(m.waypoint_policies.contains_key("bookinfo/p"));
}

#[test]
fn dry_run_annotation_marks_the_policy() {
    let text = policy("bookinfo", "p", "  action: DENY\n  rules: [{}]\n")
        .replace("  namespace: bookinfo\n", "  namespace: bookinfo\n  annotations: {istio.io/dry-run: \"true\"}\n");
    let m = mesh(&text);
    assert!(m.authorizations["bookinfo/p"].dry_run);
    assert!(allowed(&m, "reviews", None, "10.0.0.9", 80), "dry-run never denies");
}

fn peer_authn(namespace: &str, name: &str, spec: &str) -> String {
    object("security.istio.io/v1", "PeerAuthentication", namespace, name, spec)
}

#[test]
fn strict_peer_authentication_denies_plaintext() {
    let m = mesh(&peer_authn("bookinfo", "default", "  mtls: {mode: STRICT}\n"));
    assert_no_errors(&m);
    let key = format!("istio-system/{STATIC_STRICT_POLICY}");
    let p = &m.authorizations[&key];
    assert_eq!((p.scope, p.action), (PolicyScope::WorkloadSelector, PolicyAction::Deny));
    assert_eq!(p.rules, vec![vec![vec![Match { not_principals: vec![StringMatch::Presence], ..Match::default() }]]]);
    assert_eq!(workload(&m, "bookinfo", "reviews").authorization_policies, [key]);
    assert!(!allowed(&m, "reviews", None, "10.0.0.9", 9080), "plaintext denied");
    assert!(allowed(&m, "reviews", Some(OTHER), "10.0.0.9", 9080), "mTLS allowed");
}

#[test]
fn workload_permissive_overrides_mesh_strict() {
    let text = peer_authn("istio-system", "default", "  mtls: {mode: STRICT}\n")
        + &peer_authn("bookinfo", "ratings", "  selector: {matchLabels: {app: ratings}}\n  mtls: {mode: PERMISSIVE}\n");
    let m = mesh(&text);
    assert_eq!(workload(&m, "bookinfo", "reviews").authorization_policies.len(), 1);
    assert!(workload(&m, "bookinfo", "ratings").authorization_policies.is_empty());
    assert!(allowed(&m, "ratings", None, "10.0.0.9", 9080));
    assert!(!allowed(&m, "reviews", None, "10.0.0.9", 9080));
}

#[test]
fn port_level_permissive_under_strict_becomes_a_converted_policy() {
    let text = peer_authn("bookinfo", "default", "  mtls: {mode: STRICT}\n")
        + &peer_authn(
            "bookinfo",
            "ratings",
            "  selector: {matchLabels: {app: ratings}}\n  portLevelMtls:\n    9090: {mode: PERMISSIVE}\n",
        );
    let m = mesh(&text);
    assert_no_errors(&m);
    let key = "bookinfo/converted_peer_authentication_ratings";
    assert_eq!(workload(&m, "bookinfo", "ratings").authorization_policies, [key]);
    let p = &m.authorizations[key];
    assert_eq!(p.action, PolicyAction::Deny);
    assert!(allowed(&m, "ratings", None, "10.0.0.9", 9090), "plaintext allowed on the permissive port");
    assert!(!allowed(&m, "ratings", None, "10.0.0.9", 9080), "and denied elsewhere");
    assert!(allowed(&m, "ratings", Some(OTHER), "10.0.0.9", 9080));
}

#[test]
fn port_level_mtls_without_selector_is_rejected() {
    let m = mesh(&peer_authn("bookinfo", "bad", "  portLevelMtls: {9090: {mode: STRICT}}\n"));
    assert!(
        matches!(outcome(&m, "PeerAuthentication", "bookinfo", "bad"), Outcome::Error(r) if r.contains("selector"))
    );
}
