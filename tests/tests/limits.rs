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
    let node = MeshNode::start_limited(&c, 0, Limits { connections_per_pod_listener: CAP, connections_per_peer: CAP })
        .unwrap();
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
    assert!(m.contains("ztunnel_connections_limited_total{listener=\"inbound_passthrough\",limit=\"pod\"}"), "{m}");

    // Another pod on the same agent is unaffected.
    let to_bystander = SocketAddr::new(bystander.ip4().into(), 8080);
    assert_eq!(request(&flooder, to_bystander, "still-served").expect("bystander starved").got, "still-served");

    // Slots come back when the flood ends.
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(request(&flooder, to_victim, "after").expect("victim after flood").got, "after");
}

#[test]
fn a_full_pod_map_refuses_the_next_enrollment_with_the_reason_and_counts_it() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let pods: Vec<_> = (0..3).map(|i| c.add_pod(0, &format!("p{i}")).unwrap()).collect();
    let node = MeshNode::start_with_max_pods(&c, 0, 2).unwrap();
    node.enroll(&pods[0]).unwrap();
    node.enroll(&pods[1]).unwrap();
    let err = node.enroll(&pods[2]).expect_err("enrolled past the size of the kernel maps");
    assert!(err.to_string().contains("INBOUND_LISTENERS"), "reason does not name the full map: {err}");
    let m = node.agent().metrics().encode();
    assert!(m.contains("ztunnel_enrollment_rejected_total 1"), "{m}");
    // The pods that are enrolled stay captured.
    let _app = PeerServer::start(&pods[0], 8080).unwrap();
    let reply = request(&pods[2], SocketAddr::new(pods[0].ip4().into(), 8080), "still-captured").unwrap();
    assert_eq!(reply.peer.ip().to_string(), "127.0.0.6");
}

#[test]
fn a_direct_connection_to_the_outbound_listener_is_closed_and_counted() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let pod = c.add_pod(0, "client").unwrap();
    let node = MeshNode::start(&c, 0, Default::default()).unwrap();
    node.enroll(&pod).unwrap();
    // Loopback is not captured, so this reaches 15001 with no original destination recorded.
    let dst: SocketAddr = "127.0.0.1:15001".parse().unwrap();
    let got = pod.run(move || -> std::io::Result<usize> {
        let mut s = connect_bound(None, dst)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.read(&mut [0u8; 8])
    });
    assert!(!matches!(got, Ok(n) if n > 0), "{got:?}");
    std::thread::sleep(Duration::from_millis(200));
    let m = node.agent().metrics().encode();
    assert!(m.contains("ztunnel_original_destination_missing_total 1"), "{m}");
}

#[test]
fn one_remote_address_cannot_take_a_pods_whole_allowance() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let victim = c.add_pod(0, "victim").unwrap();
    let flooder = c.add_pod(0, "flooder").unwrap();
    let other = c.add_pod(0, "other").unwrap();
    let node =
        MeshNode::start_limited(&c, 0, Limits { connections_per_pod_listener: 64, connections_per_peer: 4 }).unwrap();
    node.enroll(&victim).unwrap();
    let _a = PeerServer::start(&victim, 8080).unwrap();
    let to_victim = SocketAddr::new(victim.ip4().into(), 8080);
    let _held: Vec<TcpStream> = (0..4).map(|_| flooder.run(move || connect_bound(None, to_victim)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let over = flooder.run(move || -> std::io::Result<usize> {
        let mut s = connect_bound(None, to_victim)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.read(&mut [0u8; 8])
    });
    assert!(!matches!(over, Ok(n) if n > 0), "a fifth connection from one peer was served: {over:?}");
    assert_eq!(request(&other, to_victim, "other-peer").expect("another peer refused").got, "other-peer");
    let m = node.agent().metrics().encode();
    assert!(m.contains("ztunnel_connections_limited_total{listener=\"inbound_passthrough\",limit=\"peer\"}"), "{m}");
}
