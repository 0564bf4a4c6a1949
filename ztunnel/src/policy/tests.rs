//! Pins policy evaluation to Istio ztunnel's semantics: one data-driven table (policy YAML in either accepted shape,
//! a connection, the expected decision) plus focused tests for parsing, fail-closed handling of invalid entries,
//! serialization and the store.
use std::net::SocketAddr;

use super::*;
use crate::state::{parse_local_config, Snapshot, StateStore};

/// The workload every row is evaluated for. It lists `prod/picked` and `other/listed`.
const WORKLOADS: &str = "\
workloads:
- uid: server
  name: server
  namespace: prod
  serviceAccount: server
  workloadIps: [10.0.0.2]
  protocol: HBONE
  authorizationPolicies: [prod/picked, other/listed]
";

const FE: &str = "spiffe://cluster.local/ns/web/sa/fe";
const FE_OTHER_TD: &str = "spiffe://other.td/ns/web/sa/fe";
const OTHER: &str = "spiffe://cluster.local/ns/web/sa/other";

fn conn(id: Option<&str>, src: &str, port: u16) -> ConnectionFacts {
    ConnectionFacts {
        source_identity: id.map(|s| s.parse().expect("test identity")),
        source_ip: src.parse().expect("test source ip"),
        destination: SocketAddr::new("10.0.0.2".parse().unwrap(), port),
    }
}

/// `web/fe` from 10.1.0.1 to port 80.
fn fe() -> ConnectionFacts {
    conn(Some(FE), "10.1.0.1", 80)
}

/// No identity, from 10.1.0.1 to port 80.
fn plain() -> ConnectionFacts {
    conn(None, "10.1.0.1", 80)
}

fn id(uri: &str) -> ConnectionFacts {
    conn(Some(uri), "10.1.0.1", 80)
}

/// A policy entry in Istio's shape (every key present, rules as nested lists).
fn istio(name: &str, ns: &str, scope: &str, action: &str, dry_run: bool, rules: &str) -> String {
    format!(
        "- {{name: {name}, namespace: {ns}, scope: {scope}, action: {action}, dryRun: {dry_run}, rules: {rules}}}\n"
    )
}

fn allow(rules: &str) -> String {
    istio("a", "prod", "Namespace", "Allow", false, rules)
}

fn deny(rules: &str) -> String {
    istio("d", "prod", "Namespace", "Deny", false, rules)
}

/// Istio-shape rules holding one rule → one clause → one match with `body`.
fn one(body: &str) -> String {
    format!("[[[{{{body}}}]]]")
}

/// A policy entry in this project's shape (no scope, no dryRun, nested `clauses`/`matches`).
fn ours(name: &str, action: &str, rules: &str) -> String {
    format!("- {{name: {name}, namespace: prod, action: {action}, rules: {rules}}}\n")
}

/// Our-shape rules holding one match with `body`.
fn ours_one(body: &str) -> String {
    format!("[{{clauses: [{{matches: [{{{body}}}]}}]}}]")
}

#[derive(Debug)]
enum Want {
    Allow,
    Deny(&'static str),
    /// A deny whose reason starts with this (invalid-policy reasons end with the parse error).
    DenyStarting(&'static str),
}

const ALLOW: Want = Want::Allow;
const NONE: Want = Want::Deny("allow policies exist, but none allowed");
const BY_D: Want = Want::Deny("explicitly denied by: prod/d");
const INV_A: Want = Want::DenyStarting("policy prod/a is invalid, denying all connections until it is fixed: ");
const INV_D: Want = Want::DenyStarting("policy prod/d is invalid, denying all connections until it is fixed: ");

struct Row {
    what: &'static str,
    policies: String,
    facts: ConnectionFacts,
    want: Want,
    /// Whether the policies must load without a rejection.
    clean: bool,
}

/// A row whose policies all load.
fn ok(what: &'static str, policies: impl Into<String>, facts: ConnectionFacts, want: Want) -> Row {
    let policies = policies.into();
    Row { what, policies, facts, want, clean: true }
}

/// A row with at least one rejected policy entry.
fn bad(what: &'static str, policies: impl Into<String>, facts: ConnectionFacts, want: Want) -> Row {
    let policies = policies.into();
    Row { what, policies, facts, want, clean: false }
}

const P_FE: &str = "principals: [!Exact cluster.local/ns/web/sa/fe]";
const P_OTHER: &str = "principals: [!Exact cluster.local/ns/web/sa/other]";
const SRC_HIT: &str = "sourceIps: [10.1.0.0/16]";
const SRC_MISS: &str = "sourceIps: [192.168.0.0/16]";
const SA_FE: &str = "[{namespace: web, serviceAccount: fe}]";

// The row tables are laid out by hand: one row per line or two, which rustfmt would spread over six.
#[rustfmt::skip]
fn decision_rows() -> Vec<Row> {
    vec![
        ok("no policies allow everything", "", plain(), ALLOW),
        ok("a matching ALLOW allows", allow(&one(P_FE)), fe(), ALLOW),
        ok("an ALLOW that does not match denies", allow(&one(P_FE)), id(OTHER), NONE),
        ok("a matching DENY denies and names itself", deny(&one(SRC_HIT)), fe(), BY_D),
        ok("a DENY that does not match, alone, allows", deny(&one(SRC_MISS)), fe(), ALLOW),
        ok("DENY wins over a matching ALLOW", allow(&one(P_FE)) + &deny(&one(SRC_HIT)), fe(), BY_D),
        ok("DENY wins whatever the order", deny(&one(SRC_HIT)) + &allow(&one(P_FE)), fe(), BY_D),
        ok("ALLOW decides beside a DENY that misses", allow(&one(P_FE)) + &deny(&one(SRC_MISS)), fe(), ALLOW),
        ok("any one of several ALLOWs suffices",
           allow(&one(P_OTHER)) + &istio("b", "prod", "Namespace", "Allow", false, &one(P_FE)), fe(), ALLOW),
    ]
}

#[rustfmt::skip]
fn dry_run_rows() -> Vec<Row> {
    let dry = |action: &str, body: &str| istio("dry", "prod", "Namespace", action, true, &one(body));
    vec![
        ok("a matching dry-run DENY does not deny", dry("Deny", SRC_HIT), fe(), ALLOW),
        ok("a dry-run ALLOW alone does not deny what it misses", dry("Allow", P_OTHER), fe(), ALLOW),
        ok("a matching dry-run ALLOW does not rescue", allow(&one(P_OTHER)) + &dry("Allow", P_FE), fe(), NONE),
        ok("a dry-run DENY beside a matching ALLOW", allow(&one(P_FE)) + &dry("Deny", SRC_HIT), fe(), ALLOW),
        ok("a dry-run ALLOW does not override a DENY", deny(&one(SRC_HIT)) + &dry("Allow", P_FE), fe(), BY_D),
        ok("dryRun omitted (our shape) means enforced", ours("a", "Allow", &ours_one(P_OTHER)), fe(), NONE),
    ]
}

#[rustfmt::skip]
fn structure_rows() -> Vec<Row> {
    vec![
        ok("an ALLOW with no rules never matches, so denies", allow("[]"), fe(), NONE),
        ok("a DENY with no rules never matches", deny("[]"), fe(), ALLOW),
        ok("an ALLOW without a rules key denies", "- {name: a, namespace: prod, action: Allow}\n", fe(), NONE),
        ok("a rule with no clauses matches (ALLOW)", allow("[[]]"), plain(), ALLOW),
        ok("a rule with no clauses matches (DENY)", deny("[[]]"), plain(), BY_D),
        ok("our rule with empty clauses matches", ours("d", "Deny", "[{clauses: []}]"), plain(), BY_D),
        ok("our rule with no clauses key matches", ours("d", "Deny", "[{}]"), plain(), BY_D),
        ok("a clause with no matches matches", deny("[[[]]]"), plain(), BY_D),
        ok("our clause with no matches matches", ours("d", "Deny", "[{clauses: [{matches: []}]}]"), plain(), BY_D),
        ok("an empty match group never matches (DENY)", deny("[[[{}]]]"), fe(), ALLOW),
        ok("an empty match group never matches (ALLOW)", allow("[[[{}]]]"), fe(), NONE),
        ok("an empty group is skipped, a sibling counts", allow("[[[{}, {destinationPorts: [80]}]]]"), fe(), ALLOW),
        ok("clauses are AND-ed: one failing clause fails the rule",
           allow(&format!("[[[{{destinationPorts: [80]}}], [{{{SRC_MISS}}}]]]")), fe(), NONE),
        ok("clauses are AND-ed: all holding matches",
           allow(&format!("[[[{{destinationPorts: [80]}}], [{{{SRC_HIT}}}]]]")), fe(), ALLOW),
        ok("rules are OR-ed", allow("[[[{destinationPorts: [22]}]], [[{destinationPorts: [80]}]]]"), fe(), ALLOW),
        ok("matches are OR-ed", allow("[[[{destinationPorts: [22]}, {destinationPorts: [80]}]]]"), fe(), ALLOW),
        ok("fields of a match are AND-ed", allow(&one(&format!("{P_FE}, destinationPorts: [22]"))), fe(), NONE),
    ]
}

#[rustfmt::skip]
fn identity_rows() -> Vec<Row> {
    let a = |body: &str| allow(&one(body));
    let sa = |key: &str| allow(&one(&format!("{key}: {SA_FE}")));
    let not_fe = "notPrincipals: [!Exact cluster.local/ns/web/sa/fe]";
    vec![
        ok("namespaces hit", a("namespaces: [!Exact web]"), fe(), ALLOW),
        ok("namespaces miss", a("namespaces: [!Exact ops]"), fe(), NONE),
        ok("notNamespaces hit excludes", a("notNamespaces: [!Exact web]"), fe(), NONE),
        ok("notNamespaces miss allows", a("notNamespaces: [!Exact ops]"), fe(), ALLOW),
        ok("namespaces presence needs an identity", a("namespaces: [!Presence []]"), plain(), NONE),
        ok("notNamespaces holds for plaintext", a("notNamespaces: [!Exact web]"), plain(), ALLOW),
        ok("principals exact hit", a(P_FE), fe(), ALLOW),
        ok("principals exact miss", a(P_FE), id(OTHER), NONE),
        ok("principals exact without identity", a(P_FE), plain(), NONE),
        ok("principals prefix", a("principals: [!Prefix cluster.local/ns/web/]"), fe(), ALLOW),
        ok("principals suffix hit", a("principals: [!Suffix /sa/fe]"), fe(), ALLOW),
        ok("principals suffix miss", a("principals: [!Suffix /sa/fe]"), id(OTHER), NONE),
        ok("principals presence with identity", a("principals: [!Presence []]"), fe(), ALLOW),
        ok("principals presence without identity", a("principals: [!Presence []]"), plain(), NONE),
        ok("principals include the trust domain", a(P_FE), id(FE_OTHER_TD), NONE),
        ok("!Exact with spiffe:// never matches",
           a("principals: [!Exact 'spiffe://cluster.local/ns/web/sa/fe']"), fe(), NONE),
        ok("notPrincipals hit excludes", a(not_fe), fe(), NONE),
        ok("notPrincipals holds for plaintext", a(not_fe), plain(), ALLOW),
        ok("notPrincipals presence holds for plaintext", a("notPrincipals: [!Presence []]"), plain(), ALLOW),
        ok("notPrincipals presence excludes identities", a("notPrincipals: [!Presence []]"), fe(), NONE),
        ok("serviceAccounts hit", sa("serviceAccounts"), fe(), ALLOW),
        ok("serviceAccounts ignore the trust domain", sa("serviceAccounts"), id(FE_OTHER_TD), ALLOW),
        ok("serviceAccounts wrong account", sa("serviceAccounts"), id(OTHER), NONE),
        ok("serviceAccounts wrong namespace", sa("serviceAccounts"), id("spiffe://cluster.local/ns/ops/sa/fe"), NONE),
        ok("serviceAccounts without identity", sa("serviceAccounts"), plain(), NONE),
        ok("notServiceAccounts hit excludes", sa("notServiceAccounts"), fe(), NONE),
        ok("notServiceAccounts holds for plaintext", sa("notServiceAccounts"), plain(), ALLOW),
    ]
}

#[rustfmt::skip]
fn address_rows() -> Vec<Row> {
    let a = |body: &str| allow(&one(body));
    let v6 = || conn(Some(FE), "fd00::7", 80);
    vec![
        ok("sourceIps hit", a(SRC_HIT), fe(), ALLOW),
        ok("sourceIps miss", a(SRC_MISS), fe(), NONE),
        ok("sourceIps bare IP", a("sourceIps: [10.1.0.1]"), fe(), ALLOW),
        ok("sourceIps IPv6", a("sourceIps: ['fd00::/64']"), v6(), ALLOW),
        ok("sourceIps IPv4 block against IPv6 source", a(SRC_HIT), v6(), NONE),
        ok("notSourceIps hit excludes", a("notSourceIps: [10.1.0.0/16]"), fe(), NONE),
        ok("notSourceIps miss allows", a("notSourceIps: [192.168.0.0/16]"), fe(), ALLOW),
        ok("destinationIps hit", a("destinationIps: [10.0.0.2/32]"), fe(), ALLOW),
        ok("destinationIps miss", a("destinationIps: [10.0.0.3/32]"), fe(), NONE),
        ok("notDestinationIps hit excludes", a("notDestinationIps: [10.0.0.0/24]"), fe(), NONE),
        ok("notDestinationIps miss allows", a("notDestinationIps: [10.9.0.0/24]"), fe(), ALLOW),
        ok("destinationPorts hit", a("destinationPorts: [80]"), fe(), ALLOW),
        ok("destinationPorts miss", a("destinationPorts: [22]"), fe(), NONE),
        ok("notDestinationPorts hit excludes", a("notDestinationPorts: [80]"), fe(), NONE),
        ok("notDestinationPorts miss allows", a("notDestinationPorts: [22]"), fe(), ALLOW),
        ok("addresses match without an identity", a(&format!("{SRC_HIT}, destinationPorts: [80]")), plain(), ALLOW),
    ]
}

/// Istio's own local-config example, block style.
const ISTIO_EXAMPLE: &str = "\
- action: Allow
  rules:
  - - - notDestinationPorts:
        - 9999
  name: deny-9999
  namespace: prod
  scope: Namespace
  dryRun: false
- name: picked
  namespace: prod
  scope: WorkloadSelector
  action: Deny
  dryRun: false
  rules:
  - - - principals: [!Suffix /sa/client]
        sourceIps: [10.0.0.0/8]
      - namespaces: [!Exact ops]
    - - destinationPorts: [8080]
- name: audit-plaintext
  namespace: prod
  scope: Namespace
  action: Deny
  dryRun: true
  rules:
  - - - notPrincipals: [!Presence []]
";

#[rustfmt::skip]
fn shape_rows() -> Vec<Row> {
    let o = |body: &str| ours("a", "Allow", &ours_one(body));
    let fe_plain = "principals: [cluster.local/ns/web/sa/fe]";
    let ops_client = conn(Some("spiffe://cluster.local/ns/ops/sa/client"), "10.1.0.1", 8080);
    vec![
        ok("ours: a plain string is exact (hit)", o(fe_plain), fe(), ALLOW),
        ok("ours: a plain string is exact (miss)", o(fe_plain), id(OTHER), NONE),
        ok("ours: * is presence (identity)", o("principals: ['*']"), fe(), ALLOW),
        ok("ours: * is presence (plaintext)", o("principals: ['*']"), plain(), NONE),
        ok("ours: x* is a prefix", o("principals: ['cluster.local/ns/web/*']"), fe(), ALLOW),
        ok("ours: *x is a suffix (hit)", o("principals: ['*/sa/fe']"), fe(), ALLOW),
        ok("ours: *x is a suffix (miss)", o("principals: ['*/sa/x']"), fe(), NONE),
        ok("ours: a full SPIFFE URI principal", o("principals: ['spiffe://cluster.local/ns/web/sa/fe']"), fe(), ALLOW),
        ok("ours: plain namespaces", o("namespaces: [web]"), fe(), ALLOW),
        ok("ours: serviceAccounts as ns/sa", o("serviceAccounts: [web/fe]"), fe(), ALLOW),
        ok("ours: a bare serviceAccount is in the policy namespace", o("serviceAccounts: [fe]"), fe(), NONE),
        ok("the {Exact: x} mapping form", allow(&one("namespaces: [{Exact: web}]")), fe(), ALLOW),
        ok("both shapes in one document", allow(&one(P_OTHER)) + &o(P_FE), fe(), ALLOW),
        ok("Istio example: other ports allowed", ISTIO_EXAMPLE, fe(), ALLOW),
        ok("Istio example: port 9999 not allowed", ISTIO_EXAMPLE, conn(Some(FE), "10.1.0.1", 9999), NONE),
        ok("Istio example: dry-run DENY of plaintext only logs", ISTIO_EXAMPLE, plain(), ALLOW),
        ok("Istio example: selector DENY with one clause holding", ISTIO_EXAMPLE,
           conn(Some("spiffe://cluster.local/ns/ops/sa/client"), "10.1.0.1", 80), ALLOW),
        ok("Istio example: selector DENY needs both clauses", ISTIO_EXAMPLE, ops_client,
           Want::Deny("explicitly denied by: prod/picked")),
    ]
}

#[rustfmt::skip]
fn scope_rows() -> Vec<Row> {
    let never = one(P_OTHER);
    let anything = "[[]]";
    vec![
        ok("Namespace scope: another namespace's policy does not apply",
           istio("a", "other", "Namespace", "Allow", false, &never), fe(), ALLOW),
        ok("scope omitted means Namespace",
           format!("- {{name: a, namespace: other, action: Allow, rules: {never}}}\n"), fe(), ALLOW),
        ok("Global scope applies in every namespace",
           istio("a", "istio-system", "Global", "Allow", false, &never), fe(), NONE),
        ok("WorkloadSelector applies when the workload lists it",
           istio("picked", "prod", "WorkloadSelector", "Deny", false, anything), fe(),
           Want::Deny("explicitly denied by: prod/picked")),
        ok("WorkloadSelector does not apply unlisted",
           istio("unlisted", "prod", "WorkloadSelector", "Deny", false, anything), fe(), ALLOW),
        ok("a listed policy of another namespace applies",
           istio("listed", "other", "Namespace", "Deny", false, anything), fe(),
           Want::Deny("explicitly denied by: other/listed")),
    ]
}

#[rustfmt::skip]
fn invalid_rows() -> Vec<Row> {
    let bad_ips = one("sourceIps: [not-an-ip]");
    let bad_in = |name: &str, ns: &str, scope: &str| istio(name, ns, scope, "Deny", false, &bad_ips);
    let good_allow = istio("b", "prod", "Namespace", "Allow", false, &one(P_FE));
    vec![
        bad("an invalid DENY denies everything", deny(&bad_ips), plain(), INV_D),
        bad("an invalid only-ALLOW denies everything", allow(&bad_ips), fe(), INV_A),
        bad("an invalid policy beats a matching ALLOW", good_allow + &deny(&bad_ips), fe(), INV_D),
        bad("an invalid policy in another namespace has no effect", bad_in("x", "other", "Namespace"), fe(), ALLOW),
        bad("an unreadable scope elsewhere has no effect", bad_in("x", "other", "Bogus"), fe(), ALLOW),
        bad("an unreadable scope counts as Namespace", bad_in("x", "prod", "Bogus"), fe(),
            Want::DenyStarting("policy prod/x is invalid")),
        bad("an invalid Global policy denies everywhere", bad_in("x", "istio-system", "Global"), fe(),
            Want::DenyStarting("policy istio-system/x is invalid")),
        bad("no namespace counts as Global", "- {name: x, action: Deny}\n", fe(),
            Want::DenyStarting("policy ?/x is invalid")),
        bad("an unlisted invalid selector has no effect", bad_in("x", "prod", "WorkloadSelector"), fe(), ALLOW),
        bad("a listed invalid selector denies", bad_in("picked", "prod", "WorkloadSelector"), fe(),
            Want::DenyStarting("policy prod/picked is invalid")),
        bad("a listed invalid policy elsewhere denies", bad_in("listed", "other", "Namespace"), fe(),
            Want::DenyStarting("policy other/listed is invalid")),
        bad("a selector without a name counts as Namespace",
            "- {namespace: prod, scope: WorkloadSelector, action: Deny}\n", fe(),
            Want::DenyStarting("policy prod/? is invalid")),
        bad("an invalid dry-run policy still fails closed",
            istio("a", "prod", "Namespace", "Allow", true, &bad_ips), fe(), INV_A),
        bad("an entry that is not a mapping denies everything", "- just-a-string\n", fe(),
            Want::DenyStarting("policy ?/? is invalid")),
        bad("an unknown match field is invalid", deny(&one("sourceIp: [10.9.9.9]")), fe(), INV_D),
        bad("a port out of range is invalid", deny(&one("destinationPorts: [70000]")), fe(), INV_D),
        bad("an unknown string match tag is invalid", deny(&one("principals: [!Regex x]")), fe(), INV_D),
        bad("a CIDR prefix over 32 is invalid", deny(&one("sourceIps: [10.0.0.0/33]")), fe(), INV_D),
        bad("a missing action is invalid", "- {name: d, namespace: prod, rules: []}\n", fe(), INV_D),
        bad("an unknown action is invalid", "- {name: d, namespace: prod, action: Permit}\n", fe(), INV_D),
        bad("a non-boolean dryRun is invalid",
            "- {name: d, namespace: prod, action: Deny, dryRun: maybe}\n", fe(), INV_D),
        bad("a null list is invalid", deny(&one("sourceIps: ")), fe(), INV_D),
        bad("a valid DENY beside an invalid policy elsewhere works",
            deny(&one(SRC_HIT)) + &bad_in("x", "other", "Namespace"), fe(), BY_D),
    ]
}

fn check(row: &Row) -> Result<(), String> {
    let doc =
        if row.policies.is_empty() { WORKLOADS.to_string() } else { format!("{WORKLOADS}policies:\n{}", row.policies) };
    let (cfg, errors) = parse_local_config(&doc);
    if errors.iter().any(|e| e.kind != "policy") || cfg.workloads.len() != 1 {
        return Err(format!("workloads did not load: {errors:?}"));
    }
    match (row.clean, errors.is_empty()) {
        (true, false) => return Err(format!("unexpected rejection: {errors:?}")),
        (false, true) => return Err("expected a rejection, none happened".into()),
        _ => {}
    }
    let snap = Snapshot::new(cfg);
    let w = snap.workload_by_uid("server").expect("server workload");
    let got = evaluate(snap.policies(), &w.policy_target(), &row.facts);
    let pass = match (&row.want, &got) {
        (Want::Allow, Decision::Allow) => true,
        (Want::Deny(want), Decision::Deny(reason)) => reason == want,
        (Want::DenyStarting(want), Decision::Deny(reason)) => reason.starts_with(want),
        _ => false,
    };
    if pass {
        Ok(())
    } else {
        Err(format!("got {got:?}, want {:?}", row.want))
    }
}

#[test]
fn policy_table_matches_istio_semantics() {
    let rows: Vec<Row> = [decision_rows(), dry_run_rows(), structure_rows(), identity_rows()]
        .into_iter()
        .chain([address_rows(), shape_rows(), scope_rows(), invalid_rows()])
        .flatten()
        .collect();
    let failures: Vec<String> =
        rows.iter().filter_map(|r| check(r).err().map(|e| format!("{}: {e}", r.what))).collect();
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), rows.len(), failures.join("\n"));
}

fn auth(rules: Vec<Rule>) -> Authorization {
    Authorization {
        name: "p".into(),
        namespace: "prod".into(),
        scope: PolicyScope::Namespace,
        action: PolicyAction::Allow,
        rules,
        dry_run: false,
    }
}

#[test]
fn empty_rules_rule_clause_and_match_follow_rbac_empty_policy() {
    let f = plain();
    assert!(!auth(vec![]).matches(&f), "no rules must never match");
    assert!(auth(vec![vec![]]).matches(&f), "a rule without clauses must match");
    assert!(auth(vec![vec![vec![]]]).matches(&f), "a clause without matches must match");
    assert!(!auth(vec![vec![vec![Match::default()]]]).matches(&f), "an empty match group must be skipped");
}

#[test]
fn string_matches_never_match_an_empty_value() {
    for m in [StringMatch::Exact("a".into()), StringMatch::Prefix("a".into()), StringMatch::Suffix("a".into())] {
        assert!(!m.matches(""), "{m:?} matched the empty string");
        assert!(m.matches("a"), "{m:?} missed its own value");
    }
    assert!(!StringMatch::Presence.matches(""));
    assert!(StringMatch::Presence.matches("x"));
}

#[test]
fn cidrs_take_full_length_for_bare_ips_and_refuse_bad_prefixes() {
    assert_eq!("10.0.0.1".parse::<Cidr>().unwrap().to_string(), "10.0.0.1/32");
    assert_eq!("fd00::1".parse::<Cidr>().unwrap().to_string(), "fd00::1/128");
    assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    assert!("fd00::/129".parse::<Cidr>().is_err());
    assert!("nope/8".parse::<Cidr>().is_err());
    let block: Cidr = "10.1.0.0/16".parse().unwrap();
    assert!(block.contains("::ffff:10.1.2.3".parse().unwrap()), "an IPv4-mapped source must count as IPv4");
    assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("1.2.3.4".parse().unwrap()));
}

#[test]
fn rejected_policies_are_reported_by_kind_and_name_and_kept_as_invalid() {
    let doc = "policies:\n- {name: broken, namespace: prod, action: Allow, rules: [[[{sourceIps: [not-an-ip]}]]]}\n\
               - {name: typo, namespace: prod, action: Permit}\n";
    let (cfg, errors) = parse_local_config(doc);
    assert!(cfg.policies.is_empty());
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0].to_string(), "policy prod/broken: rules[0][0][0].sourceIps[0]: invalid CIDR \"not-an-ip\"");
    assert!(errors[1].to_string().starts_with("policy prod/typo: action: invalid action"), "{}", errors[1]);
    let keys: Vec<String> = cfg.invalid_policies.iter().map(InvalidPolicy::key).collect();
    assert_eq!(keys, ["prod/broken", "prod/typo"]);
}

#[test]
fn fixing_an_invalid_policy_restores_normal_evaluation() {
    let store = StateStore::default();
    let doc = |ips: &str| format!("{WORKLOADS}policies:\n{}", deny(&one(&format!("sourceIps: [{ips}]"))));
    let eval = |store: &StateStore, f: &ConnectionFacts| {
        let snap = store.snapshot();
        let w = snap.workload_by_uid("server").expect("server workload");
        evaluate(snap.policies(), &w.policy_target(), f)
    };
    assert_eq!(store.apply_yaml(&doc("not-an-ip")).len(), 1);
    assert!(!eval(&store, &conn(Some(FE), "172.16.0.1", 80)).allowed(), "broken DENY must deny everything");
    assert_eq!(store.rejected_total(), 1);
    assert!(store.apply_yaml(&doc("10.1.0.0/16")).is_empty());
    assert!(store.snapshot().invalid_policies().is_empty());
    assert!(eval(&store, &conn(Some(FE), "172.16.0.1", 80)).allowed(), "fixed DENY must only deny its sources");
    assert_eq!(eval(&store, &fe()), Decision::Deny("explicitly denied by: prod/d".into()));
}

#[test]
fn istio_shape_round_trips_through_yaml_serialization() {
    let (cfg, errors) = parse_local_config(&format!("{WORKLOADS}policies:\n{ISTIO_EXAMPLE}"));
    assert!(errors.is_empty(), "{errors:?}");
    let yaml = serde_yaml_ng::to_string(&serde_yaml_ng::to_value(&cfg.policies).unwrap()).unwrap();
    assert!(yaml.contains("!Suffix /sa/client") && yaml.contains("!Presence []"), "{yaml}");
    let (again, errors) = parse_local_config(&format!("policies:\n{yaml}"));
    assert!(errors.is_empty(), "{errors:?}\n{yaml}");
    assert_eq!(again.policies, cfg.policies);
}

#[test]
fn config_dump_json_shows_invalid_policies_and_reloads() {
    let (cfg, _) = parse_local_config("policies:\n- {name: x, namespace: prod, scope: Bogus, action: Deny}\n");
    let json = serde_json::to_value(&cfg).unwrap();
    assert_eq!(json["invalid_policies"][0]["name"], "x");
    assert_eq!(json["invalid_policies"][0]["scope"], serde_json::Value::Null);
    let (cfg, errors) = parse_local_config(&format!("{WORKLOADS}policies:\n{ISTIO_EXAMPLE}"));
    assert!(errors.is_empty());
    let json = serde_json::to_string(&serde_json::json!({ "policies": cfg.policies })).unwrap();
    let (again, errors) = parse_local_config(&json);
    assert!(errors.is_empty(), "config_dump JSON must load back: {errors:?}\n{json}");
    assert_eq!(again.policies, cfg.policies);
}

#[test]
fn workload_without_trust_domain_leaves_it_empty_for_the_agent_to_fill() {
    let (cfg, errors) = parse_local_config(WORKLOADS);
    assert!(errors.is_empty());
    assert_eq!(cfg.workloads[0].trust_domain, "");
}

#[test]
fn misspelt_policies_key_keeps_the_last_state_instead_of_dropping_policies() {
    let store = StateStore::default();
    assert!(store.apply_yaml(&format!("{WORKLOADS}policies:\n{}", deny("[[]]"))).is_empty());
    let errors = store.apply_yaml(&format!("{WORKLOADS}polices:\n{}", deny("[[]]")));
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].kind, "document");
    assert_eq!(store.snapshot().config.policies.len(), 1, "the DENY must stay in force");
}
