//! Capture beside an eBPF CNI's socket load balancer. Cilium's `socketLB` and Calico eBPF
//! attach their own `connect4` at the cgroup root and rewrite service VIPs to backends; a
//! capture that runs after them sees a backend, not the service the app asked for, and the
//! mesh then routes (and authorizes) the wrong thing. Istio ambient asks such users to turn
//! that off for pods; we don't: our connect programs ask the kernel to run first.
//!
//! Each test attaches a VIP-rewriting `connect4` at the cgroup2 root (as those CNIs do),
//! before or after the agent attaches, and checks that an enrolled pod's connection to the
//! VIP is still captured with the VIP as its original destination and reaches the mesh's
//! endpoint, while an unenrolled pod's connection is rewritten by the foreign program
//! (proving it is live). Each test uses its own VIP, so the parallel tests' foreign
//! programs at the shared root never touch each other's traffic.
use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use mesh_tests::apps::{request, PeerServer};
use mesh_tests::foreign_lb::ForeignLb;
use mesh_tests::mesh::{sweep_pins, wait_record, workload_yaml, write_mesh_config, MeshNode};
use mesh_tests::{cgroup2_root, Cluster, Pod};
use ztunnel::proxy::Direction;
use ztunnel::redirect::Exclusions;

const WAIT: Duration = Duration::from_secs(5);

struct Setup {
    _c: Cluster,
    n0: MeshNode,
    _n1: MeshNode,
    client: Pod,
    outsider: Pod,
    _apps: Vec<PeerServer>,
}

/// Client and an unenrolled outsider on node 0; the service's endpoint (enrolled) and a
/// decoy (the foreign program's backend, unenrolled) on node 1.
fn setup(vip: SocketAddrV4, foreign_first: bool, foreign: &mut Option<ForeignLb>) -> Setup {
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let outsider = c.add_pod(0, "outsider").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let decoy = c.add_pod(1, "decoy").unwrap();
    let backend = SocketAddrV4::new(decoy.ip4(), 8080);
    let attach = || ForeignLb::attach(cgroup2_root().unwrap(), vip, backend).expect("foreign connect4 at the root");
    if foreign_first {
        *foreign = Some(attach());
    }
    let n0 = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    let n1 = MeshNode::start(&c, 1, Exclusions::default()).unwrap();
    let svc = "  services:\n    default/server.default.svc.cluster.local:\n      80: 8080\n";
    let yaml = format!(
        "workloads:\n{}{}services:\n- name: server\n  namespace: default\n  hostname: server.default.svc.cluster.local\n  vips: [\"/{}\"]\n  ports:\n    80: 8080\n",
        workload_yaml(&client, "default", "client", ""),
        workload_yaml(&server, "default", "server", svc),
        vip.ip(),
    );
    write_mesh_config(&c, &yaml, &[&n0, &n1]).unwrap();
    n0.enroll(&client).unwrap();
    n1.enroll(&server).unwrap();
    if !foreign_first {
        *foreign = Some(attach());
    }
    let apps = vec![PeerServer::start(&server, 8080).unwrap(), PeerServer::start(&decoy, 8080).unwrap()];
    Setup { _c: c, n0, _n1: n1, client, outsider, _apps: apps }
}

/// The enrolled client's connection to the VIP is captured with the VIP as its original
/// destination and carried in HBONE to the service's endpoint, not the decoy.
fn assert_capture_saw_the_vip(s: &Setup, vip: SocketAddrV4) {
    let vip = SocketAddr::V4(vip);
    // The foreign program is live: an unenrolled pod's connect to the VIP reaches the decoy.
    let r = request(&s.outsider, vip, "outside").expect("the foreign load balancer sends the outsider to the decoy");
    assert_eq!(r.got, "outside");
    let mut ev = s.n0.events();
    let r = request(&s.client, vip, "through-the-mesh").expect("request through the mesh");
    assert_eq!(r.got, "through-the-mesh");
    let rec = wait_record(&mut ev, WAIT, |r| r.direction == Direction::Outbound && r.error.is_none())
        .expect("an outbound record for the client's connection");
    assert_eq!(rec.dst, vip, "capture saw the address after the foreign rewrite");
    assert_eq!(rec.protocol, "HBONE");
    assert_eq!(rec.dst_identity.as_deref(), Some("spiffe://cluster.local/ns/default/sa/server"));
}

#[test]
fn a_vip_rewriting_connect4_attached_at_the_root_before_capture_does_not_hide_the_vip() {
    let vip: SocketAddrV4 = "10.96.201.11:80".parse().unwrap();
    let mut foreign = None;
    let s = setup(vip, true, &mut foreign);
    assert_capture_saw_the_vip(&s, vip);
}

#[test]
fn a_vip_rewriting_connect4_attached_at_the_root_after_capture_does_not_hide_the_vip() {
    let vip: SocketAddrV4 = "10.96.201.12:80".parse().unwrap();
    let mut foreign = None;
    let s = setup(vip, false, &mut foreign);
    assert_capture_saw_the_vip(&s, vip);
}
