//! End-to-end capture on a mini-cluster: real kernel programs (connect4/6, sock_ops,
//! sk_lookup), real node agents, real sockets. Needs root; fails (never skips) otherwise.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mesh_tests::apps::{request, request_here, PeerServer};
use mesh_tests::mesh::{kernel_link_ids, shortcut_links, sweep_pins, wait_record, MeshNode};
use mesh_tests::{Cluster, InNetns};
use ztunnel::proxy::Direction;
use ztunnel::redirect::Exclusions;

const APP_PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(5);
const INBOUND_SOURCE: &str = "127.0.0.6";

fn cluster_with_mesh(exclusions: Exclusions) -> (Cluster, MeshNode, MeshNode) {
    sweep_pins();
    let mut c = Cluster::new(2).expect("building mini-cluster (needs root)");
    c.add_pod(0, "client").unwrap();
    c.add_pod(1, "server").unwrap();
    let n0 = MeshNode::start(&c, 0, exclusions.clone()).expect("node 0 agent");
    let n1 = MeshNode::start(&c, 1, exclusions).expect("node 1 agent");
    (c, n0, n1)
}

#[test]
fn pod_to_pod_goes_through_both_in_pod_proxies_v4_and_v6() {
    let (c, n0, n1) = cluster_with_mesh(Exclusions::default());
    let (client, server) = (c.pods()[0].clone(), c.pods()[1].clone());
    n0.enroll(&client).unwrap();
    n1.enroll(&server).unwrap();
    let _app = PeerServer::start(&server, APP_PORT).unwrap();

    for ip in [IpAddr::from(server.ip4()), IpAddr::from(server.ip6())] {
        let dst = SocketAddr::new(ip, APP_PORT);
        let (mut ev0, mut ev1) = (n0.events(), n1.events());
        let before0 = n0.counters();
        let before1 = n1.counters();
        let reply = request(&client, dst, "hello").unwrap();
        assert_eq!(reply.got, "hello", "server saw the request");

        let out = wait_record(&mut ev0, WAIT, |r| r.direction == Direction::Outbound && r.dst == dst)
            .unwrap_or_else(|| panic!("source proxy logged no outbound record for {dst}"));
        assert_eq!(out.error, None);
        assert_eq!(out.bytes_sent, 6, "request bytes went through 15001");
        let inb = wait_record(&mut ev1, WAIT, |r| r.direction == Direction::InboundPassthrough && r.dst == dst)
            .unwrap_or_else(|| panic!("destination proxy logged no inbound record for {dst}"));
        assert_eq!(
            inb.src.ip(),
            match ip {
                IpAddr::V4(_) => IpAddr::from(client.ip4()),
                IpAddr::V6(_) => IpAddr::from(client.ip6()),
            }
        );

        let (a0, a1) = (n0.counters(), n1.counters());
        if ip.is_ipv4() {
            assert!(a0.connect4.captured > before0.connect4.captured, "connect4 captured: {a0:?}");
            // The proxy's own (marked) upstream connect was seen and not re-captured.
            assert!(a0.connect4.bypassed > before0.connect4.bypassed, "proxy connect bypassed: {a0:?}");
            assert_eq!(reply.peer.ip().to_string(), INBOUND_SOURCE, "app reached from the inbound proxy");
        } else {
            assert!(a0.connect6.captured > before0.connect6.captured, "connect6 captured: {a0:?}");
            assert!(a0.connect6.bypassed > before0.connect6.bypassed, "proxy connect bypassed: {a0:?}");
        }
        assert!(a0.sock_ops.captured > before0.sock_ops.captured, "sock_ops recorded: {a0:?}");
        assert!(a1.sk_lookup.captured > before1.sk_lookup.captured, "sk_lookup steered: {a1:?}");
    }
}

#[test]
fn unenrolled_pods_excluded_ports_and_probes_are_not_captured() {
    let ex = Exclusions { outbound_ports: vec![9090], ..Default::default() };
    let (mut c, n0, n1) = cluster_with_mesh(ex);
    let plain_client = c.add_pod(0, "plainc").unwrap();
    let plain_server = c.add_pod(1, "plains").unwrap();
    let (client, server) = (c.pods()[0].clone(), c.pods()[1].clone());
    n0.enroll(&client).unwrap();
    n1.enroll(&server).unwrap();
    let _app = PeerServer::start(&server, APP_PORT).unwrap();
    let _app9090 = PeerServer::start(&server, 9090).unwrap();
    let _plain_app = PeerServer::start(&plain_server, APP_PORT).unwrap();
    let (mut ev0, mut ev1) = (n0.events(), n1.events());

    // Not enrolled on either side: direct, no records.
    let r = request(&plain_client, SocketAddr::new(plain_server.ip4().into(), APP_PORT), "x").unwrap();
    assert_eq!(r.peer.ip(), IpAddr::from(plain_client.ip4()));

    // Unenrolled client to enrolled server: only inbound is captured.
    let r = request(&plain_client, SocketAddr::new(server.ip4().into(), APP_PORT), "y").unwrap();
    assert_eq!(r.peer.ip().to_string(), INBOUND_SOURCE);

    // Enrolled client to unenrolled server: outbound captured, the app sees the client pod.
    let plain_dst = SocketAddr::new(plain_server.ip4().into(), APP_PORT);
    let r = request(&client, plain_dst, "z").unwrap();
    assert_eq!(r.peer.ip(), IpAddr::from(client.ip4()));
    assert!(wait_record(&mut ev0, WAIT, |r| r.dst == plain_dst).is_some());

    // Excluded outbound port: connect4 leaves it alone (the server side still captures).
    let before = n0.counters();
    let excluded = SocketAddr::new(server.ip4().into(), 9090);
    request(&client, excluded, "e").unwrap();
    assert!(n0.counters().connect4.bypassed > before.connect4.bypassed);
    assert!(wait_record(&mut ev1, WAIT, |r| r.dst == excluded).is_some(), "inbound still captured");

    // Kubelet-style probe from the node's bridge address reaches the app directly.
    let before = n1.counters();
    let dst = SocketAddr::new(server.ip4().into(), APP_PORT);
    let r = c.node(1).run(move || request_here(dst, "probe")).unwrap();
    assert_eq!(r.peer.ip(), IpAddr::from(c.node(1).gateway4()));
    assert!(n1.counters().sk_lookup.bypassed > before.sk_lookup.bypassed);

    // None of the unenrolled client's traffic and no excluded-port traffic reached node 0's proxy.
    std::thread::sleep(Duration::from_millis(200));
    while let Ok(r) = ev0.try_recv() {
        assert_ne!(r.src.ip(), IpAddr::from(plain_client.ip4()), "unenrolled pod captured: {r:?}");
        assert_ne!(r.dst, excluded, "excluded port captured: {r:?}");
        assert_ne!(r.dst.port(), 9090);
    }
}

#[test]
fn restart_keeps_capture_without_duplicates_and_uninstall_removes_everything() {
    let (c, mut n0, n1) = cluster_with_mesh(Exclusions::default());
    let (client, server) = (c.pods()[0].clone(), c.pods()[1].clone());
    n0.enroll(&client).unwrap();
    n1.enroll(&server).unwrap();
    let _app = PeerServer::start(&server, APP_PORT).unwrap();
    let dst = SocketAddr::new(server.ip4().into(), APP_PORT);
    request(&client, dst, "before").unwrap();

    let old_links = n0.link_ids();
    let shortcut = shortcut_links();
    assert_eq!(old_links.len(), 4 + shortcut, "3 cgroup links + 1 pod link (+ the shortcut's): {old_links:?}");

    n0.restart().unwrap();
    // The CNI re-sends the pods it knows, then says the snapshot is complete.
    n0.enroll(&client).unwrap();
    let cni = n0.client().unwrap();
    assert_eq!(cni.snapshot_sent().unwrap(), Ok(()));
    let mut ev0 = n0.events();
    request(&client, dst, "after").unwrap();
    assert!(wait_record(&mut ev0, WAIT, |r| r.dst == dst).is_some(), "captured after restart");

    let new_links = n0.link_ids();
    assert_eq!(new_links.len(), 4 + shortcut, "no duplicate links: {new_links:?}");
    let live = kernel_link_ids();
    // (The shortcut's sk_msg link is kept and given the new program in place.)
    for id in old_links.iter().filter(|id| !new_links.contains(id)) {
        assert!(!live.contains(id), "link {id} of the previous agent still attached");
    }
    for id in &new_links {
        assert!(live.contains(id), "link {id} missing from the kernel listing");
    }

    // Del removes the pod's link and pins; a second Del is refused.
    let pin_dir = n0.pin_dir().to_path_buf();
    n0.remove(&client).unwrap();
    assert!(!pin_dir.join("pods").join(client.uid()).exists());
    let after_del = n0.link_ids();
    assert_eq!(after_del.len(), 3 + shortcut);
    let live = kernel_link_ids();
    for id in new_links.iter().filter(|id| !after_del.contains(id)) {
        assert!(!live.contains(id), "pod link {id} still attached after Del");
    }
    assert!(n0.remove(&client).unwrap_err().to_string().contains("unknown pod"));
    // Without capture the client now reaches the server's inbound proxy directly.
    let r = request(&client, dst, "uncaptured").unwrap();
    assert_eq!(r.peer.ip().to_string(), INBOUND_SOURCE);

    let prog_ids: Vec<u32> = aya::programs::loaded_links()
        .filter_map(|l| l.ok())
        .filter(|l| after_del.contains(&l.id()))
        .map(|l| l.program_id())
        .collect();
    assert_eq!(prog_ids.len(), 3 + shortcut);
    n0.uninstall().unwrap();
    let live = kernel_link_ids();
    for id in &after_del {
        assert!(!live.contains(id), "link {id} still attached after uninstall");
    }
    assert!(!pin_dir.exists(), "pins left behind in {}", pin_dir.display());
    // The programs themselves are unloaded once the agent's last fd is gone.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let loaded: Vec<u32> = aya::programs::loaded_programs().filter_map(|p| p.ok()).map(|p| p.id()).collect();
        let left: Vec<&u32> = prog_ids.iter().filter(|id| loaded.contains(id)).collect();
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "programs {left:?} still loaded after uninstall");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(n1);
}

#[test]
fn a_pod_kept_but_never_re_added_after_restart_is_released_not_black_holed() {
    let (mut c, mut n0, _n1) = cluster_with_mesh(Exclusions::default());
    let server = c.pods()[0].clone();
    let outsider = c.add_pod(0, "outsider").unwrap();
    n0.enroll(&server).unwrap();
    let _app = PeerServer::start(&server, APP_PORT).unwrap();
    let dst = SocketAddr::new(server.ip4().into(), APP_PORT);
    assert_eq!(request(&outsider, dst, "before").unwrap().peer.ip().to_string(), INBOUND_SOURCE);

    n0.restart().unwrap();
    let cni = n0.client().unwrap();
    // The new process has no listeners for it: Keep alone cannot serve the pod.
    let keep = cni.keep(server.uid()).unwrap();
    assert!(keep.as_ref().is_err_and(|e| e.contains("send Add")), "{keep:?}");
    assert_eq!(cni.snapshot_sent().unwrap(), Ok(()));
    // Released: the app is reachable again (directly), not dropped by a capture with no proxy.
    let reply = request(&outsider, dst, "after").expect("pod black-holed after Keep without Add");
    assert_eq!(reply.peer.ip(), IpAddr::from(outsider.ip4()));
    assert!(n0.agent().pods().is_empty());
}

#[test]
fn a_pod_whose_re_add_fails_after_restart_stays_captured_and_fails_closed() {
    let (mut c, mut n0, _n1) = cluster_with_mesh(Exclusions::default());
    let server = c.pods()[0].clone();
    let outsider = c.add_pod(0, "outsider").unwrap();
    n0.enroll(&server).unwrap();
    let _app = PeerServer::start(&server, APP_PORT).unwrap();
    let dst = SocketAddr::new(server.ip4().into(), APP_PORT);
    n0.restart().unwrap();
    // Something in the pod grabs 15001 while no agent serves it: the re-Add cannot open it.
    let squatter = server.run(|| std::net::TcpListener::bind("127.0.0.1:15001")).unwrap();
    let cni = n0.client().unwrap();
    let add = n0.enroll(&server);
    assert!(add.is_err(), "re-Add succeeded although 15001 was taken");
    assert_eq!(cni.snapshot_sent().unwrap(), Ok(()));
    // Still captured, and with no proxy to serve it: refused, never delivered unproxied.
    let reached = request(&outsider, dst, "sneak");
    assert!(reached.is_err(), "the app was reached without the proxy: {reached:?}");
    drop(squatter);
}
