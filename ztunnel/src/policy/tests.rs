use std::net::SocketAddr;

use super::*;
use crate::state::parse_local_config;

const DOC: &str = r#"
workloads:
- uid: w1
  name: server
  namespace: prod
  serviceAccount: server
  workloadIps: [10.0.0.2]
  protocol: HBONE
  authorizationPolicies: [prod/only-frontend]
policies:
- name: only-frontend
  namespace: prod
  scope: WorkloadSelector
  action: Allow
  rules:
  - clauses:
    - matches:
      - principals: ["cluster.local/ns/web/sa/frontend"]
      - namespaces: ["ops"]
        notDestinationPorts: [22]
- name: block-bad-net
  namespace: prod
  action: Deny
  rules:
  - clauses:
    - matches:
      - sourceIps: ["192.168.66.0/24"]
"#;

fn facts(id: Option<&str>, src: &str, dport: u16) -> ConnectionFacts {
    ConnectionFacts {
        source_identity: id.map(|s| s.parse().unwrap()),
        source_ip: src.parse().unwrap(),
        destination: SocketAddr::new("10.0.0.2".parse().unwrap(), dport),
    }
}

#[test]
fn allow_deny_and_not_fields_follow_istio_semantics() {
    let (cfg, errors) = parse_local_config(DOC);
    assert!(errors.is_empty(), "{errors:?}");
    let w = &cfg.workloads[0];
    let p = &cfg.policies;
    let fe = "spiffe://cluster.local/ns/web/sa/frontend";
    assert_eq!(evaluate(p, w, &facts(Some(fe), "10.1.0.1", 80)), Decision::Allow);
    // DENY wins over a matching ALLOW.
    assert!(!evaluate(p, w, &facts(Some(fe), "192.168.66.7", 80)).allowed());
    // An ALLOW applies, nothing matches: denied.
    let other = "spiffe://cluster.local/ns/web/sa/other";
    assert_eq!(evaluate(p, w, &facts(Some(other), "10.1.0.1", 80)), Decision::Deny("no ALLOW policy matched".into()));
    // Second match of the clause: namespace ops, but not port 22.
    let ops = "spiffe://cluster.local/ns/ops/sa/x";
    assert!(evaluate(p, w, &facts(Some(ops), "10.1.0.1", 80)).allowed());
    assert!(!evaluate(p, w, &facts(Some(ops), "10.1.0.1", 22)).allowed());
    // Plaintext (no identity) cannot satisfy a principal match.
    assert!(!evaluate(p, w, &facts(None, "10.1.0.1", 80)).allowed());
}

#[test]
fn without_policies_everything_is_allowed_and_wildcards_match() {
    let (cfg, _) = parse_local_config(DOC);
    let w = &cfg.workloads[0];
    assert!(evaluate(&[], w, &facts(None, "1.2.3.4", 1)).allowed());
    let mut p = cfg.policies.clone();
    p[0].rules[0].clauses[0].matches[0].principals = vec!["cluster.local/ns/web/*".into()];
    assert!(evaluate(&p, w, &facts(Some("spiffe://cluster.local/ns/web/sa/any"), "10.1.0.1", 80)).allowed());
}

#[test]
fn bad_policies_are_rejected_by_name() {
    let doc = "policies:\n- name: broken\n  namespace: prod\n  action: Allow\n  rules:\n  - clauses:\n    - matches:\n      - sourceIps: [not-an-ip]\n- name: typo\n  namespace: prod\n  action: Permit\n";
    let (cfg, errors) = parse_local_config(doc);
    assert!(cfg.policies.is_empty());
    assert_eq!(errors.len(), 2);
    assert!(errors[0].to_string().starts_with("policy prod/broken: invalid CIDR"), "{}", errors[0]);
    assert!(errors[1].to_string().starts_with("policy prod/typo:"), "{}", errors[1]);
}
