//! The same-node fast path: a connection between two pods of one agent is handed from the
//! outbound side to the destination's inbound admission inside the process. These tests
//! show it carries the bytes with no TLS on the wire, that policy still refuses and cuts,
//! that both reporters' metrics carry the right identities, and that turned off the same
//! traffic takes HBONE.
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::Duration;

use mesh_tests::apps::{request, OpenEcho, PeerServer};
use mesh_tests::istio::metric_sum;
use mesh_tests::loadgen::EchoServer;
use mesh_tests::mesh::{sweep_pins, wait_record, workload_yaml, write_mesh_config, MeshNode};
use mesh_tests::wire::sniff;
use mesh_tests::{Cluster, InNetns, Pod};
use ztunnel::proxy::Direction;

const WAIT: Duration = Duration::from_secs(5);

fn id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// Two pods on node 0 (`client`, `server`), one agent; `fast` picks the path.
struct OneNode {
    c: Cluster,
    n0: MeshNode,
    client: Pod,
    server: Pod,
    workloads: String,
}

impl OneNode {
    fn new(fast: bool) -> OneNode {
        sweep_pins();
        let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
        let client = c.add_pod(0, "client").unwrap();
        let server = c.add_pod(0, "server").unwrap();
        let n0 = if fast {
            MeshNode::start_with_fast_path(&c, 0).unwrap()
        } else {
            MeshNode::start_without_fast_path(&c, 0).unwrap()
        };
        let workloads = format!(
            "workloads:\n{}{}",
            workload_yaml(&client, "default", "client", ""),
            workload_yaml(&server, "default", "server", "")
        );
        write_mesh_config(&c, &workloads, &[&n0]).unwrap();
        n0.enroll(&client).unwrap();
        n0.enroll(&server).unwrap();
        OneNode { c, n0, client, server, workloads }
    }

    fn set_policies(&self, policies: &str) {
        write_mesh_config(&self.c, &format!("{}policies:\n{policies}", self.workloads), &[&self.n0]).unwrap();
    }

    fn metric(&self, family: &str, labels: &[(&str, &str)]) -> u64 {
        metric_sum(&self.n0.agent().metrics().encode(), family, labels)
    }
}

fn deny_from(principal: &str) -> String {
    format!("- name: no-{principal}\n  namespace: default\n  action: Deny\n  rules:\n  - clauses:\n    - matches:\n      - principals: [\"cluster.local/ns/default/sa/{principal}\"]\n")
}

#[test]
fn same_node_traffic_skips_tls_and_keeps_identities() {
    let m = OneNode::new(true);
    let _app = PeerServer::start(&m.server, 8080).unwrap();
    let dst = SocketAddr::new(m.server.ip4().into(), 8080);
    let mut ev = m.n0.events();
    let client = m.client.clone();
    let (cap, reply) = sniff(m.c.node(0), move || request(&client, dst, "fast-path-bytes")).unwrap();
    let reply = reply.unwrap();
    assert_eq!(reply.got, "fast-path-bytes");
    assert!(cap.tcp_payloads(15008).is_empty(), "something went to 15008: the connection took HBONE");

    let out = wait_record(&mut ev, WAIT, |r| r.direction == Direction::Outbound && r.dst == dst).expect("outbound");
    assert_eq!((out.protocol, out.error.clone()), ("HBONE", None));
    assert_eq!(out.dst_identity.as_deref(), Some(id("server").as_str()));
    let inb = wait_record(&mut ev, WAIT, |r| r.direction == Direction::Inbound && r.dst == dst).expect("inbound");
    assert_eq!(inb.src_identity.as_deref(), Some(id("client").as_str()));
    assert_eq!(inb.src.ip(), IpAddr::from(m.client.ip4()));
    assert_eq!(inb.bytes_sent, ("fast-path-bytes".len() + 1) as u64);
    assert_eq!(m.n0.agent().pool_stats().connections_opened, 0, "an HBONE connection was opened");
    assert_eq!(m.metric("ztunnel_same_node_connections_total", &[]), 1);
}

#[test]
fn same_node_metrics_show_both_reporters_with_identities() {
    let m = OneNode::new(true);
    let _app = PeerServer::start(&m.server, 8080).unwrap();
    let dst = SocketAddr::new(m.server.ip4().into(), 8080);
    let mut ev = m.n0.events();
    for i in 0..3 {
        request(&m.client, dst, &format!("m{i}")).unwrap();
    }
    for _ in 0..3 {
        wait_record(&mut ev, WAIT, |r| r.direction == Direction::Inbound).expect("inbound record");
    }
    let principals = [("source_principal", id("client")), ("destination_principal", id("server"))];
    for reporter in ["source", "destination"] {
        let labels = [
            ("reporter", reporter),
            (principals[0].0, principals[0].1.as_str()),
            (principals[1].0, principals[1].1.as_str()),
            ("source_workload", "client"),
            ("destination_workload", "server"),
            ("connection_security_policy", "mutual_tls"),
        ];
        assert_eq!(m.metric("istio_tcp_connections_opened_total", &labels), 3, "reporter={reporter}");
        assert!(m.metric("istio_tcp_received_bytes_total", &labels) > 0, "reporter={reporter}");
    }
    assert_eq!(m.metric("ztunnel_same_node_connections_total", &[]), 3);
}

#[test]
fn same_node_deny_refuses_and_cuts_open_connections() {
    let m = OneNode::new(true);
    let listener = m.server.run(|| TcpListener::bind(("::", 9000))).unwrap();
    let _echo = EchoServer::spawn(listener).unwrap();
    let dst = SocketAddr::new(m.server.ip4().into(), 9000);
    let mut open = OpenEcho::new(&m.client, dst).expect("allowed before the DENY");
    let mut ev = m.n0.events();

    m.set_policies(&deny_from("client"));
    assert!(open.is_cut(), "an open same-node connection survived a DENY");
    assert!(OpenEcho::new(&m.client, dst).is_err(), "a new same-node connection passed a DENY");
    let rec = wait_record(&mut ev, WAIT, |r| {
        r.direction == Direction::Inbound && r.error.as_deref().is_some_and(|e| e.contains("explicitly denied"))
    })
    .expect("deny record on the destination side");
    assert_eq!(rec.src_identity.as_deref(), Some(id("client").as_str()));
    let denied = [("reporter", "destination"), ("response_flags", "DENY")];
    assert!(m.metric("istio_tcp_connections_failed_total", &denied) >= 1);
    // The source side reports a failed connect, as when an HBONE CONNECT is refused.
    let refused = wait_record(&mut ev, WAIT, |r| r.direction == Direction::Outbound && r.error.is_some())
        .expect("outbound refusal");
    assert!(refused.error.unwrap().contains("denied"));
}

#[test]
fn same_node_fast_path_off_takes_hbone() {
    let m = OneNode::new(false);
    let _app = PeerServer::start(&m.server, 8080).unwrap();
    let dst = SocketAddr::new(m.server.ip4().into(), 8080);
    let client = m.client.clone();
    let (cap, reply) = sniff(m.c.node(0), move || request(&client, dst, "via-hbone")).unwrap();
    assert_eq!(reply.unwrap().got, "via-hbone");
    assert!(!cap.tcp_payloads(15008).is_empty(), "nothing went to 15008 with the fast path off");
    assert_eq!(m.n0.agent().pool_stats().connections_opened, 1);
    assert_eq!(m.metric("ztunnel_same_node_connections_total", &[]), 0);
}
