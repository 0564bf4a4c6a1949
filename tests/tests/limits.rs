//! Bounded resources: a flood against one pod stops at that pod's connection cap (reset and
//! counted) while the other pods on the node keep being served.
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use mesh_tests::apps::{connect_bound, request, PeerServer};
use mesh_tests::mesh::{sweep_pins, MeshNode};
use mesh_tests::{Cluster, InNetns};
use ztunnel::proxy::limit::Limits;

const CAP: usize = 8;

#[test]
fn a_pod_at_its_connection_cap_resets_new_connections_and_other_pods_still_get_theirs() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let victim = c.add_pod(0, "victim").unwrap();
    let bystander = c.add_pod(0, "bystander").unwrap();
    let flooder = c.add_pod(0, "flooder").unwrap();
    let node = MeshNode::start_limited(&c, 0, Limits { connections_per_pod_listener: CAP }).unwrap();
    node.enroll(&victim).unwrap();
    node.enroll(&bystander).unwrap();
    let _a = PeerServer::start(&victim, 8080).unwrap();
    let _b = PeerServer::start(&bystander, 8080).unwrap();
    let to_victim = SocketAddr::new(victim.ip4().into(), 8080);

    // Fill the victim's inbound listener with idle connections.
    let held: Vec<TcpStream> =
        (0..CAP).map(|_| flooder.run(move || connect_bound(None, to_victim)).expect("within the cap")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let over = flooder.run(move || -> std::io::Result<usize> {
        let mut s = connect_bound(None, to_victim)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.read(&mut [0u8; 8])
    });
    assert!(!matches!(over, Ok(n) if n > 0), "connection past the cap was served: {over:?}");
    let m = node.agent().metrics().encode();
    assert!(m.contains("ztunnel_connections_limited_total{listener=\"inbound_passthrough\"}"), "{m}");

    // Another pod on the same agent is unaffected.
    let to_bystander = SocketAddr::new(bystander.ip4().into(), 8080);
    assert_eq!(request(&flooder, to_bystander, "still-served").expect("bystander starved").got, "still-served");

    // Slots come back when the flood ends.
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(request(&flooder, to_victim, "after").expect("victim after flood").got, "after");
}
