//! L4 authorization end to end: ALLOW permits, DENY wins, plaintext is held to the same
//! policies, and a policy change cuts connections that are already open.
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use mesh_tests::apps::OpenEcho as Open;
use mesh_tests::loadgen::EchoServer;
use mesh_tests::mesh::{sweep_pins, wait_record, workload_yaml, write_mesh_config, MeshNode};
use mesh_tests::{Cluster, InNetns, Pod};
use ztunnel::proxy::Direction;
use ztunnel::redirect::Exclusions;

const WAIT: Duration = Duration::from_secs(5);

fn allow(name: &str, principal: &str) -> String {
    format!("- name: {name}\n  namespace: default\n  action: Allow\n  rules:\n  - clauses:\n    - matches:\n      - principals: [\"cluster.local/ns/default/sa/{principal}\"]\n")
}

fn deny(name: &str, principal: &str) -> String {
    allow(name, principal).replace("Allow", "Deny")
}

#[test]
fn allow_permits_deny_wins_and_changes_cut_open_connections() {
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let other = c.add_pod(0, "other").unwrap();
    let plain = c.add_pod(0, "plain").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let n0 = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    let n1 = MeshNode::start(&c, 1, Exclusions::default()).unwrap();
    let workloads = format!(
        "workloads:\n{}{}{}",
        workload_yaml(&client, "default", "client", ""),
        workload_yaml(&other, "default", "other", ""),
        workload_yaml(&server, "default", "server", ""),
    );
    let config = |policies: &[String]| format!("{workloads}policies:\n{}", policies.concat());
    write_mesh_config(&c, &config(&[allow("a", "client"), allow("b", "other")]), &[&n0, &n1]).unwrap();
    for p in [&client, &other] {
        n0.enroll(p).unwrap();
    }
    n1.enroll(&server).unwrap();
    let listener = server.run(|| TcpListener::bind(("::", 9000))).unwrap();
    let _echo = EchoServer::spawn(listener).unwrap();
    let dst = SocketAddr::new(server.ip4().into(), 9000);
    let mut ev1 = n1.events();

    // Both principals are allowed in; the plaintext pod is not (no identity) and is reset.
    let mut from_client = Open::new(&client, dst).expect("client allowed");
    let mut from_other = Open::new(&other, dst).expect("other allowed");
    let plain_result = Open::new(&plain, dst);
    assert!(plain_result.is_err(), "plaintext passed an identity-only ALLOW");
    let rec = wait_record(&mut ev1, WAIT, |r| r.direction == Direction::InboundPassthrough && r.error.is_some())
        .expect("denied record");
    assert_eq!(rec.error.as_deref(), Some("allow policies exist, but none allowed"));

    // Removing the policy that allowed `client` cuts its open connection; `other` stays.
    write_mesh_config(&c, &config(&[allow("b", "other")]), &[&n0, &n1]).unwrap();
    assert!(from_client.is_cut(), "open connection survived losing its ALLOW");
    from_other.ping().expect("still allowed");
    assert!(Open::new(&client, dst).is_err(), "new connection from client not refused");
    let rec =
        wait_record(&mut ev1, WAIT, |r| r.direction == Direction::Inbound && r.error.is_some()).expect("401 record");
    assert!(rec.error.as_deref().unwrap().contains("allow policies exist, but none allowed"), "{rec:?}");

    // A DENY wins over the ALLOW and cuts `other` too.
    write_mesh_config(&c, &config(&[allow("b", "other"), deny("d", "other")]), &[&n0, &n1]).unwrap();
    assert!(from_other.is_cut(), "open connection survived a DENY");
    assert!(Open::new(&other, dst).is_err());
    let rec = wait_record(&mut ev1, WAIT, |r| {
        r.error.as_deref().is_some_and(|e| e.contains("explicitly denied by: default/d"))
    })
    .expect("deny record");
    assert_eq!(rec.src_identity.as_deref(), Some("spiffe://cluster.local/ns/default/sa/other"));

    // Without policies everything is allowed again.
    write_mesh_config(&c, &workloads, &[&n0, &n1]).unwrap();
    Open::new(&client, dst).expect("allowed without policies");
    Open::new(&plain, dst).expect("plaintext allowed without policies");
    let denied = n1.agent().metrics().encode();
    assert!(
        denied.lines().any(|l| l.starts_with("ztunnel_authorization_denied_total{direction=\"inbound\"}")),
        "{denied}"
    );
    assert!(
        denied.lines().any(|l| l.starts_with("ztunnel_authorization_denied_total{direction=\"inbound_passthrough\"}")),
        "{denied}"
    );
    // As Istio counts them: opened, then closed and failed with response_flags="DENY".
    for family in ["istio_tcp_connections_closed_total", "istio_tcp_connections_failed_total"] {
        assert!(
            denied.lines().any(|l| l.starts_with(family)
                && l.contains("response_flags=\"DENY\"")
                && l.contains("reporter=\"destination\"")),
            "{family} has no DENY series: {denied}"
        );
    }
}

#[test]
fn malformed_config_entries_are_rejected_by_name_and_the_rest_applies() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let server = c.add_pod(0, "server").unwrap();
    let n0 = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    let yaml = format!(
        "workloads:\n{}- uid: broken\n  name: broken\n  namespace: default\n  workloadIps: [not-an-ip]\npolicies:\n- name: bad\n  namespace: default\n  action: Maybe\n",
        workload_yaml(&server, "default", "server", "")
    );
    write_mesh_config(&c, &yaml, &[&n0]).unwrap();
    let snap = n0.agent().state().snapshot();
    assert_eq!(snap.config.workloads.len(), 1, "the good workload applied");
    assert!(snap.config.policies.is_empty());
    assert_eq!(n0.agent().state().rejected_total(), 2);
    let m = n0.agent().metrics().encode();
    assert!(m.contains("ztunnel_config_rejected_total{kind=\"workload\"} 1"), "{m}");
    assert!(m.contains("ztunnel_config_rejected_total{kind=\"policy\"} 1"), "{m}");
    // A document that is not YAML at all keeps the last good state.
    write_mesh_config(&c, "workloads: [unclosed", &[]).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(n0.agent().state().snapshot().config.workloads.len(), 1);
}

/// Sends one HBONE CONNECT to `server`'s 15008 from inside `from`, authenticated as
/// `identity` (a certificate from the cluster's own CA), with a chosen `forwarded` header.
fn forged_connect(
    c: &Cluster,
    from: &Pod,
    identity: &str,
    server: SocketAddr,
    forwarded_for: SocketAddr,
) -> Result<(), String> {
    let dst = "spiffe://cluster.local/ns/default/sa/server";
    mesh_tests::mesh::hbone_connect(c, from, identity, dst, server.ip(), server, forwarded_for)
}

#[test]
fn source_ip_policy_checks_the_tcp_peer_not_the_forwarded_header() {
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let attacker = c.add_pod(0, "attacker").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let n0 = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    let n1 = MeshNode::start(&c, 1, Exclusions::default()).unwrap();
    let only_client_ip = format!(
        "- name: from-client-ip\n  namespace: default\n  action: Allow\n  rules:\n  - clauses:\n    - matches:\n      - sourceIps: [\"{}\"]\n",
        client.ip4()
    );
    let yaml = format!(
        "workloads:\n{}{}policies:\n{only_client_ip}",
        workload_yaml(&client, "default", "client", ""),
        workload_yaml(&server, "default", "server", "")
    );
    write_mesh_config(&c, &yaml, &[&n0, &n1]).unwrap();
    n0.enroll(&client).unwrap();
    n1.enroll(&server).unwrap();
    let listener = server.run(|| TcpListener::bind(("::", 9000))).unwrap();
    let _echo = EchoServer::spawn(listener).unwrap();
    let dst = SocketAddr::new(server.ip4().into(), 9000);
    Open::new(&client, dst).expect("the allowed source IP gets in");
    // A valid mesh identity from another address, claiming the allowed IP in `forwarded`.
    let claimed = SocketAddr::new(client.ip4().into(), 40000);
    let forged = forged_connect(&c, &attacker, "spiffe://cluster.local/ns/default/sa/attacker", dst, claimed);
    let err = forged.expect_err("forged forwarded header passed a sourceIps policy");
    assert!(err.contains("401"), "{err}");
}

#[test]
fn an_invalid_policy_makes_the_workloads_it_selects_deny_all_until_fixed() {
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let n0 = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    let n1 = MeshNode::start(&c, 1, Exclusions::default()).unwrap();
    let workloads = format!(
        "workloads:\n{}{}",
        workload_yaml(&client, "default", "client", ""),
        workload_yaml(&server, "default", "server", "")
    );
    // A DENY that cannot be read must not vanish: the namespace it selects denies all.
    let broken = "policies:\n- name: broken-deny\n  namespace: default\n  action: Deny\n  rules:\n  - clauses:\n    - matches:\n      - sourceIps: [\"10.0.0.0/99\"]\n";
    write_mesh_config(&c, &format!("{workloads}{broken}"), &[&n0, &n1]).unwrap();
    n0.enroll(&client).unwrap();
    n1.enroll(&server).unwrap();
    let listener = server.run(|| TcpListener::bind(("::", 9000))).unwrap();
    let _echo = EchoServer::spawn(listener).unwrap();
    let dst = SocketAddr::new(server.ip4().into(), 9000);
    let mut ev1 = n1.events();
    assert!(Open::new(&client, dst).is_err(), "a workload selected by an invalid policy accepted a connection");
    let rec = wait_record(&mut ev1, WAIT, |r| r.error.is_some()).expect("denied record");
    assert!(rec.error.as_deref().unwrap().contains("default/broken-deny is invalid"), "{rec:?}");
    assert!(n1.agent().metrics().encode().contains("ztunnel_config_rejected_total{kind=\"policy\"}"));
    // Fixed: normal evaluation again.
    write_mesh_config(&c, &workloads, &[&n0, &n1]).unwrap();
    Open::new(&client, dst).expect("allowed once the policy is fixed");
}
