//! The app sees the real client pod's address, on IPv4 and IPv6, over HBONE and for
//! plaintext inbound, with no iptables (issue 9, deliverable 3): the inbound proxy dials the
//! app transparently from the client's address, and a per-pod policy rule brings the app's
//! replies back to it. Each test also checks that the connection went through the proxy
//! exactly once (records and eBPF counters), and node probes still reach apps directly.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mesh_tests::apps::{request, request_here, PeerServer};
use mesh_tests::mesh::{sweep_pins, wait_record, workload_yaml, write_mesh_config, MeshNode};
use mesh_tests::{Cluster, InNetns, Pod};
use ztunnel::proxy::Direction;

const WAIT: Duration = Duration::from_secs(5);
const APP_PORT: u16 = 8080;

struct Mesh {
    c: Cluster,
    n0: MeshNode,
    n1: MeshNode,
    client: Pod,
    server: Pod,
    outsider: Pod,
    _apps: Vec<PeerServer>,
}

/// Client (mesh) and an outsider (no mesh) on node 0, server (mesh) on node 1; both agents
/// keep sources.
fn mesh() -> Mesh {
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let outsider = c.add_pod(0, "outsider").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let n0 = MeshNode::start_keeping_source(&c, 0).unwrap();
    let n1 = MeshNode::start_keeping_source(&c, 1).unwrap();
    let yaml = format!(
        "workloads:\n{}{}",
        workload_yaml(&client, "default", "client", ""),
        workload_yaml(&server, "default", "server", "")
    );
    write_mesh_config(&c, &yaml, &[&n0, &n1]).unwrap();
    n0.enroll(&client).unwrap();
    n1.enroll(&server).unwrap();
    let apps = vec![PeerServer::start(&server, APP_PORT).unwrap()];
    Mesh { c, n0, n1, client, server, outsider, _apps: apps }
}

fn ip(pod: &Pod, v6: bool) -> IpAddr {
    if v6 {
        pod.ip6().into()
    } else {
        pod.ip4().into()
    }
}

/// Client → server over HBONE: the app's peer is the client pod, and the server's inbound
/// steering captured the connection once (the proxy's own dial to the app was let through).
fn assert_hbone_keeps_source(m: &Mesh, v6: bool) {
    let dst = SocketAddr::new(ip(&m.server, v6), APP_PORT);
    let (mut ev0, mut ev1) = (m.n0.events(), m.n1.events());
    let before = m.n1.counters();
    let r = request(&m.client, dst, "hbone").expect("client reaches server");
    assert_eq!(r.got, "hbone");
    assert_eq!(r.peer.ip(), ip(&m.client, v6), "the app did not see the client pod's address");
    let out = wait_record(&mut ev0, WAIT, |r| r.direction == Direction::Outbound && r.dst == dst).expect("outbound");
    assert_eq!(out.protocol, "HBONE");
    wait_record(&mut ev1, WAIT, |r| r.direction == Direction::Inbound && r.dst == dst).expect("inbound record");
    let after = m.n1.counters();
    assert_eq!(after.sk_lookup.captured, before.sk_lookup.captured, "HBONE on 15008 is not steered; nothing looped");
}

#[test]
fn an_app_sees_the_client_pods_ipv4_address_over_hbone() {
    let m = mesh();
    assert_hbone_keeps_source(&m, false);
}

#[test]
fn an_app_sees_the_client_pods_ipv6_address_over_hbone() {
    let m = mesh();
    assert_hbone_keeps_source(&m, true);
}

/// A client outside the mesh → server (plaintext inbound): the app sees the outsider, and
/// the steering program captured exactly one connection (the proxy's dial was not steered
/// back to it).
fn assert_plaintext_keeps_source(m: &Mesh, v6: bool) {
    let dst = SocketAddr::new(ip(&m.server, v6), APP_PORT);
    let mut ev1 = m.n1.events();
    let before = m.n1.counters();
    let r = request(&m.outsider, dst, "plain").expect("outsider reaches server");
    assert_eq!(r.peer.ip(), ip(&m.outsider, v6), "the app did not see the outsider's address");
    wait_record(&mut ev1, WAIT, |r| r.direction == Direction::InboundPassthrough && r.dst == dst)
        .expect("the plaintext inbound went through the proxy");
    let after = m.n1.counters();
    assert_eq!(after.sk_lookup.captured - before.sk_lookup.captured, 1, "steered more than once: a loop");
}

#[test]
fn an_app_sees_a_plaintext_clients_ipv4_address() {
    let m = mesh();
    assert_plaintext_keeps_source(&m, false);
}

#[test]
fn an_app_sees_a_plaintext_clients_ipv6_address() {
    let m = mesh();
    assert_plaintext_keeps_source(&m, true);
}

#[test]
fn a_node_probe_still_reaches_an_app_keeping_sources_directly() {
    let m = mesh();
    let before = m.n1.counters();
    let dst = SocketAddr::new(m.server.ip4().into(), APP_PORT);
    let r = m.c.node(1).run(move || request_here(dst, "probe")).unwrap();
    assert_eq!(r.peer.ip(), IpAddr::from(m.c.node(1).gateway4()));
    let after = m.n1.counters();
    assert!(after.sk_lookup.bypassed > before.sk_lookup.bypassed, "the probe was not bypassed");
    assert_eq!(after.sk_lookup.captured, before.sk_lookup.captured, "the probe was captured");
}

#[test]
fn no_proxy_dial_stays_registered_after_the_connections() {
    let m = mesh();
    for v6 in [false, true] {
        assert_plaintext_keeps_source(&m, v6);
        assert_hbone_keeps_source(&m, v6);
    }
    // The steering program lets a registered dial through: none may outlive its connect.
    assert_eq!(m.n1.agent().capture().proxy_dials().registered(), 0);
}
