//! Ways around capture found by reading the data path as an attacker would, each pinned by
//! a test that failed on the earlier programs: connections aimed at the proxy's own ports
//! (which looped until fds ran out), sources that only look like loopback, addresses the
//! kernel map did not know (link-local, added after enrollment, reused after a late `Del`)
//! and ports that were exempt for no reason. A connection is "captured" when the app sees
//! the inbound proxy (127.0.0.6 on IPv4, the pod's own address on IPv6) and the node agent
//! records it.
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use mesh_tests::apps::{connect_bound, request, request_from, PeerServer};
use mesh_tests::cmd::ip_in;
use mesh_tests::mesh::{sweep_pins, wait_record, workload_yaml, write_mesh_config, MeshNode};
use mesh_tests::{Cluster, InNetns, Pod};
use tokio::sync::broadcast::Receiver;
use ztunnel::proxy::{ConnectionRecord, Direction};
use ztunnel::redirect::Exclusions;

const APP_PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(5);
const INBOUND_SOURCE: &str = "127.0.0.6";

/// One node: `server` enrolled (app on 8080), `outsider` on the same bridge, not enrolled.
struct Setup {
    c: Cluster,
    node: MeshNode,
    server: Pod,
    outsider: Pod,
}

fn setup() -> Setup {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let server = c.add_pod(0, "server").unwrap();
    let outsider = c.add_pod(0, "outsider").unwrap();
    let node = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    node.enroll(&server).unwrap();
    Setup { c, node, server, outsider }
}

/// Asserts the app saw the inbound proxy, not the client, and the agent recorded `dst`.
fn assert_captured(s: &Setup, reply_peer: SocketAddr, dst: SocketAddr, ev: &mut Receiver<ConnectionRecord>) {
    let proxied = reply_peer.ip().to_string() == INBOUND_SOURCE || reply_peer.ip() == IpAddr::from(s.server.ip6());
    assert!(proxied, "app reached directly by {reply_peer}, not through the proxy");
    let rec = wait_record(ev, WAIT, |r| r.direction == Direction::InboundPassthrough && r.dst.ip() == dst.ip());
    assert!(rec.is_some(), "no inbound record for {dst}");
}

/// Sends a byte and waits for the far end to close or reset.
fn refused(pod: &Pod, dst: SocketAddr) -> bool {
    pod.run(move || match connect_bound(None, dst) {
        Err(_) => true,
        Ok(mut s) => {
            s.set_read_timeout(Some(WAIT)).unwrap();
            let _ = s.write_all(b"x\n");
            let mut buf = [0u8; 16];
            !matches!(s.read(&mut buf), Ok(n) if n > 0)
        }
    })
}

/// TCP sockets in `pod`'s network namespace, in any state. Counted there rather than as this
/// process's fds, which tests running in parallel also open and close.
fn tcp_sockets(pod: &Pod) -> usize {
    pod.run(|| {
        ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
            .iter()
            .map(|f| std::fs::read_to_string(f).expect("socket table").lines().skip(1).count())
            .sum()
    })
}

#[test]
fn plaintext_to_the_inbound_proxy_port_is_refused_without_a_loop() {
    let s = setup();
    let mut ev = s.node.events();
    let sockets = tcp_sockets(&s.server);
    for port in [15006, 15001] {
        let dst = SocketAddr::new(s.server.ip4().into(), port);
        assert!(refused(&s.outsider, dst), "{dst} answered");
        let rec = wait_record(&mut ev, WAIT, |r| r.dst == dst && r.error.is_some()).expect("refusal record");
        assert!(rec.error.as_deref().unwrap().contains("proxy port"), "{rec:?}");
    }
    std::thread::sleep(Duration::from_millis(500));
    // A loop dials itself over and over: many records and a climbing socket count.
    let mut looped = 0;
    while ev.try_recv().is_ok() {
        looped += 1;
    }
    assert!(looped < 3, "{looped} more records after the refusals: the connection looped");
    let now = tcp_sockets(&s.server);
    assert!(now < sockets + 20, "sockets in the server pod grew from {sockets} to {now}");
}

#[test]
fn hbone_connect_to_a_proxy_port_is_refused_with_400() {
    proxy_port_target_is_refused(false, "400");
}

#[test]
fn same_node_connect_to_a_proxy_port_is_refused() {
    proxy_port_target_is_refused(true, "proxy port");
}

/// A pod on the same node aims at the server pod's proxy ports, over HBONE or the
/// same-node fast path (`fast`): the destination side refuses each, and the source's record
/// says why (`outbound_error`).
fn proxy_port_target_is_refused(fast: bool, outbound_error: &str) {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(0, "server").unwrap();
    let node = if fast {
        MeshNode::start_with_fast_path(&c, 0).unwrap()
    } else {
        MeshNode::start_without_fast_path(&c, 0).unwrap()
    };
    let yaml = format!(
        "workloads:\n{}{}",
        workload_yaml(&client, "default", "client", ""),
        workload_yaml(&server, "default", "server", "")
    );
    write_mesh_config(&c, &yaml, &[&node]).unwrap();
    node.enroll(&client).unwrap();
    node.enroll(&server).unwrap();
    let mut ev = node.events();
    for port in [15006, 15001, 15008] {
        // The client's captured connect becomes an HBONE CONNECT to server:port.
        let dst = SocketAddr::new(server.ip4().into(), port);
        assert!(refused(&client, dst), "{dst} answered");
        let inb = wait_record(&mut ev, WAIT, |r| r.direction == Direction::Inbound && r.dst == dst)
            .unwrap_or_else(|| panic!("no inbound record for {dst}"));
        assert!(inb.error.as_deref().unwrap_or("").contains("proxy port"), "{inb:?}");
        let out = wait_record(&mut ev, WAIT, |r| r.direction == Direction::Outbound && r.dst == dst).expect("outbound");
        assert!(out.error.as_deref().unwrap_or("").contains(outbound_error), "{out:?}");
    }
}

#[test]
fn ipv6_source_that_embeds_v4_loopback_is_captured() {
    let s = setup();
    let _app = PeerServer::start(&s.server, APP_PORT).unwrap();
    // 2001:db8::ffff:7f00:1 ends in the bytes of ::ffff:127.0.0.1; only an exact match is loopback.
    let spoof: Ipv6Addr = "2001:db8::ffff:7f00:1".parse().unwrap();
    ip_in(s.outsider.netns_name(), &["-6", "addr", "add", &format!("{spoof}/128"), "dev", "eth0", "nodad"]).unwrap();
    ip_in(s.server.netns_name(), &["-6", "route", "add", &format!("{spoof}/128"), "dev", "eth0"]).unwrap();
    let mut ev = s.node.events();
    let dst = SocketAddr::new(s.server.ip6().into(), APP_PORT);
    let reply = request_from(&s.outsider, Some(spoof.into()), dst, "spoof").unwrap();
    assert_captured(&s, reply.peer, dst, &mut ev);
}

#[test]
fn link_local_destination_is_captured() {
    let s = setup();
    let _app = PeerServer::start(&s.server, APP_PORT).unwrap();
    let out = ip_in(s.server.netns_name(), &["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"]).unwrap();
    let ll: Ipv6Addr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no link-local address in {out:?}"));
    let ifindex = s.outsider.run(|| nix::net::if_::if_nametoindex("eth0")).unwrap();
    let dst = SocketAddr::V6(SocketAddrV6::new(ll, APP_PORT, 0, ifindex));
    let mut ev = s.node.events();
    let reply = request_from(&s.outsider, None, dst, "link-local").unwrap();
    let proxied = reply.peer.ip().to_string() == INBOUND_SOURCE || matches!(reply.peer.ip(), IpAddr::V6(a) if a == ll);
    assert!(proxied, "app reached directly by {}", reply.peer);
    assert!(wait_record(&mut ev, WAIT, |r| r.direction == Direction::InboundPassthrough
        && r.dst.ip() == IpAddr::V6(ll))
    .is_some());
}

#[test]
fn address_added_after_enrollment_is_captured() {
    let s = setup();
    let _app = PeerServer::start(&s.server, APP_PORT).unwrap();
    ip_in(s.server.netns_name(), &["addr", "add", "10.244.0.200/24", "dev", "eth0"]).unwrap();
    let mut ev = s.node.events();
    let dst: SocketAddr = "10.244.0.200:8080".parse().unwrap();
    let reply = request(&s.outsider, dst, "late-address").unwrap();
    assert_captured(&s, reply.peer, dst, &mut ev);
}

#[test]
fn late_del_of_a_departed_pod_does_not_uncapture_the_pod_reusing_its_address() {
    let mut s = setup();
    let old = s.c.add_pod(0, "old").unwrap();
    s.node.enroll(&old).unwrap();
    // `old` goes away without a Del, and `server` takes over its address.
    let reused = old.ip4();
    ip_in(old.netns_name(), &["addr", "del", &format!("{reused}/24"), "dev", "eth0"]).unwrap();
    ip_in(s.server.netns_name(), &["addr", "add", &format!("{reused}/24"), "dev", "eth0"]).unwrap();
    ip_in(s.outsider.netns_name(), &["neigh", "flush", "all"]).unwrap();
    // The late Del of the departed pod must only remove what it owns.
    s.node.remove(&old).unwrap();
    let _app = PeerServer::start(&s.server, APP_PORT).unwrap();
    let mut ev = s.node.events();
    let dst = SocketAddr::new(reused.into(), APP_PORT);
    let reply = request(&s.outsider, dst, "reused").unwrap();
    assert_captured(&s, reply.peer, dst, &mut ev);
}

#[test]
fn proxy_admin_ports_are_not_exempt_inbound() {
    let s = setup();
    // Nothing of ours listens on 15000/15020/15021 in the pod: an app that does is protected.
    for port in [15000, 15020, 15021] {
        let _app = PeerServer::start(&s.server, port).unwrap();
        let mut ev = s.node.events();
        let dst = SocketAddr::new(s.server.ip4().into(), port);
        let reply = request(&s.outsider, dst, "admin-port").unwrap();
        assert_captured(&s, reply.peer, dst, &mut ev);
    }
}

#[test]
fn an_app_that_copies_the_proxy_mark_is_still_captured() {
    let mut s = setup();
    let app = s.c.add_pod(0, "marker").unwrap();
    s.node.enroll(&app).unwrap();
    let _server = PeerServer::start(&s.outsider, APP_PORT).unwrap();
    let mut ev = s.node.events();
    let before = s.node.counters();
    // A process of the pod (in the pod's cgroup, not the agent's) sets SO_MARK=0x539 itself.
    let dst = SocketAddr::new(s.outsider.ip4().into(), APP_PORT);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_marked_client"));
    cmd.args([dst.to_string(), "1337".to_string()]).stdout(std::process::Stdio::piped());
    let out = app.spawn(cmd).unwrap().wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("got=marked"), "{out:?}");
    let rec = wait_record(&mut ev, WAIT, |r| r.direction == Direction::Outbound && r.dst == dst);
    assert!(rec.is_some(), "a connect carrying the proxy mark skipped the outbound proxy");
    assert!(s.node.counters().connect4.captured > before.connect4.captured);
}

#[test]
fn a_connect_whose_original_destination_cannot_be_recorded_fails_instead_of_leaving_unproxied() {
    let mut s = setup();
    let app = s.c.add_pod(0, "app").unwrap();
    s.node.enroll(&app).unwrap();
    let _server = PeerServer::start(&s.outsider, APP_PORT).unwrap();
    let dst = SocketAddr::new(s.outsider.ip4().into(), APP_PORT);
    let before = s.node.counters();
    s.node.agent().capture().inject_record_failure(true).unwrap();
    let result = request(&app, dst, "unrecorded");
    s.node.agent().capture().inject_record_failure(false).unwrap();
    assert!(result.is_err(), "the connect went out although its destination was not recorded: {result:?}");
    assert!(s.node.counters().connect4.errors > before.connect4.errors, "failure not counted");
    assert_eq!(request(&app, dst, "recorded").unwrap().got, "recorded");
}
