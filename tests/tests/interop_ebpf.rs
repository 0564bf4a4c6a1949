//! Istio's own ztunnel on OUR eBPF capture, with no iptables at all (issue 9, deliverable
//! 2b). On node 1, `ztunnel cni --ebpf-capture` enrolls each ambient pod in our kernel
//! programs, then hands it to Istio's ztunnel (shared mode) over ZDS. Istio's ztunnel does
//! nothing for us: its outbound listener learns each connection's destination with
//! `getsockopt(SO_ORIGINAL_DST)` as it would behind iptables, answered by our
//! `cgroup/getsockopt` program; its 15006 listener is put into the inbound map by our
//! `sock_ops` listen hook because its process runs in the proxy cgroup given to the CNI. On
//! node 0 our agent serves one pod. The checks are our capture tests' (v4, v6, original
//! destination, excluded ports, probe bypass), run with Istio's ztunnel as the proxy, plus
//! the eBPF counters that show which program did the work. Without the peer binary the
//! tests print one line and return.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use mesh_tests::apps::{request, request_here, PeerServer};
use mesh_tests::cgroup::create_cgroup;
use mesh_tests::cni::{CniNode, EXCLUDED_INBOUND_PORT, EXCLUDED_OUTBOUND_PORT};
use mesh_tests::control_plane::ControlPlane;
use mesh_tests::istio::{local_config, peer_or_skip, write_fake_ca_plugin_dir, IstioZtunnel, TempDir};
use mesh_tests::mesh::{sweep_pins, wait_record, write_mesh_config, MeshNode};
use mesh_tests::{Cluster, InNetns, Pod};
use serde_json::Value;
use ztunnel::proxy::{ConnectionRecord, Direction};

const WAIT: Duration = Duration::from_secs(5);
const APP_PORT: u16 = 8080;

fn id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// Fields drop in order: Istio's ztunnel, the apps, our CNI (its capture pins), our agent,
/// the controller, then the cluster (and the proxy cgroup in it) and the CA files.
struct Setup {
    istio: IstioZtunnel,
    _apps: Vec<PeerServer>,
    cni: CniNode,
    agent: MeshNode,
    _cp: ControlPlane,
    /// On node 0, served by our agent.
    ours: Pod,
    /// On node 1, captured by our CNI and served by Istio's ztunnel.
    a: Pod,
    /// On node 0, in no mesh.
    outsider: Pod,
    cluster: Cluster,
    _ca: TempDir,
}

fn setup() -> Option<Setup> {
    let binary = peer_or_skip()?;
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let ours = c.add_pod(0, "ours").unwrap();
    let outsider = c.add_pod(0, "outsider").unwrap();
    let a = c.add_pod(1, "a").unwrap();
    let config = local_config(&[&ours, &a]);
    let ca = TempDir::new(&format!("{}-istio-fake-ca", c.prefix())).unwrap();
    write_fake_ca_plugin_dir(ca.path()).unwrap();
    let agent = MeshNode::start_with_plugin_ca(&c, 0, ca.path()).unwrap();
    write_mesh_config(&c, &config, &[&agent]).unwrap();
    agent.enroll_as(&ours, "default", ours.name()).unwrap();

    let cp = ControlPlane::start_ambient(&c, &[(&a, 1), (&ours, 0)]);
    let proxy_cgroup: PathBuf = c.cgroup_path().join("istio-ztunnel");
    create_cgroup(&proxy_cgroup).unwrap();
    let cni = CniNode::start_with_capture(&c, 1, &cp.access, &proxy_cgroup).expect("ztunnel cni --ebpf-capture");
    let istio = IstioZtunnel::start_shared_with(
        &binary,
        c.node(1),
        Some(&proxy_cgroup),
        cni.zds_socket(),
        &config,
        &format!("{}-istio-ebpf", c.prefix()),
        &[],
    )
    .expect("Istio's ztunnel in shared mode, in the proxy cgroup");
    cni.wait(WAIT, |s| s.synced && s.agents == 1).expect("our CNI synced with Istio's ztunnel connected");
    let run = cni.plugin("ADD", &a);
    assert_eq!(run.code, Some(0), "plugin ADD failed: {run:?}");
    let mut apps: Vec<PeerServer> =
        [&ours, &a, &outsider].iter().map(|p| PeerServer::start(p, APP_PORT).unwrap()).collect();
    apps.push(PeerServer::start(&outsider, EXCLUDED_OUTBOUND_PORT).unwrap());
    apps.push(PeerServer::start(&a, EXCLUDED_INBOUND_PORT).unwrap());
    Some(Setup { istio, _apps: apps, cni, agent, _cp: cp, ours, a, outsider, cluster: c, _ca: ca })
}

fn app(pod: &Pod, v6: bool) -> SocketAddr {
    let ip: IpAddr = if v6 { pod.ip6().into() } else { pod.ip4().into() };
    SocketAddr::new(ip, APP_PORT)
}

fn completed(entry: &Value, direction: &str) -> bool {
    entry["message"] == "connection complete" && entry["direction"] == direction
}

/// `a` (Istio's ztunnel on our capture) → our pod: Istio's outbound got the right original
/// destination from our getsockopt program and tunnelled it in HBONE; we verified its
/// identity.
fn assert_outbound_through_istio_on_our_capture(s: &Setup, v6: bool) {
    let dst = app(&s.ours, v6);
    let before = s.cni.capture_counters().unwrap();
    let (mut events, seen) = (s.agent.events(), s.istio.access_log().len());
    let reply = request(&s.a, dst, "hello-ours").expect("a reaches our pod through Istio's ztunnel");
    assert_eq!(reply.got, "hello-ours");
    let entry = s
        .istio
        .wait_access_log(seen, WAIT, |e| completed(e, "outbound") && e["dst.identity"] == id("ours"))
        .expect("Istio's ztunnel carried the connection");
    assert_eq!(entry["dst.hbone_addr"], dst.to_string(), "original destination: {entry}");
    assert_eq!(entry["src.identity"], id("a"), "{entry}");
    assert!(entry.get("error").is_none(), "{entry}");
    let inb = wait_record(&mut events, WAIT, |r: &ConnectionRecord| r.direction == Direction::Inbound && r.dst == dst)
        .expect("our inbound record");
    assert_eq!(inb.protocol, "HBONE");
    assert_eq!(inb.src_identity.as_deref(), Some(id("a").as_str()));
    let after = s.cni.capture_counters().unwrap();
    let connect = if v6 { (before.connect6, after.connect6) } else { (before.connect4, after.connect4) };
    assert!(connect.1.captured > connect.0.captured, "the app's connect was not captured by our program");
    assert!(after.getsockopt.captured > before.getsockopt.captured, "SO_ORIGINAL_DST was not answered by our program");
}

#[test]
fn istios_ztunnel_on_our_ebpf_capture_carries_a_pods_ipv4_connection_with_its_original_destination() {
    let Some(s) = setup() else { return };
    assert_outbound_through_istio_on_our_capture(&s, false);
}

#[test]
fn istios_ztunnel_on_our_ebpf_capture_carries_a_pods_ipv6_connection_with_its_original_destination() {
    let Some(s) = setup() else { return };
    assert_outbound_through_istio_on_our_capture(&s, true);
}

#[test]
fn our_listen_hook_gives_istios_15006_listener_the_pods_plaintext_inbound() {
    let Some(s) = setup() else { return };
    let counters = s.cni.capture_counters().unwrap();
    assert!(counters.listen.captured >= 1, "Istio's 15006 listener was not adopted: {counters:?}");
    let dst = app(&s.a, false);
    let seen = s.istio.access_log().len();
    let before = s.cni.capture_counters().unwrap();
    let reply = request(&s.outsider, dst, "plain-in").expect("plaintext inbound reaches a through Istio's ztunnel");
    assert_eq!(reply.got, "plain-in");
    let entry = s
        .istio
        .wait_access_log(seen, WAIT, |e| completed(e, "inbound") && e["dst.addr"] == dst.to_string())
        .expect("Istio's ztunnel handled the inbound connection");
    assert!(entry.get("error").is_none(), "{entry}");
    assert!(s.cni.capture_counters().unwrap().sk_lookup.captured > before.sk_lookup.captured);
}

#[test]
fn a_pod_captured_for_istios_ztunnel_fails_closed_when_its_listeners_are_gone() {
    let Some(mut s) = setup() else { return };
    s.istio.kill();
    let dst = app(&s.a, false);
    assert!(request(&s.outsider, dst, "in").is_err(), "inbound reached the app with no proxy");
    assert!(request(&s.a, app(&s.ours, false), "out").is_err(), "outbound left the pod with no proxy");
}

#[test]
fn node_probes_reach_an_app_captured_for_istios_ztunnel_directly() {
    let Some(s) = setup() else { return };
    let before = s.cni.capture_counters().unwrap();
    let dst = app(&s.a, false);
    let seen = s.istio.access_log().len();
    let r = s.cluster.node(1).run(move || request_here(dst, "probe")).unwrap();
    assert_eq!(r.peer.ip(), IpAddr::from(s.cluster.node(1).gateway4()), "the app saw the probe's own address");
    assert!(s.cni.capture_counters().unwrap().sk_lookup.bypassed > before.sk_lookup.bypassed);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        s.istio.access_log().iter().skip(seen).all(|e| e["dst.addr"] != dst.to_string()),
        "the probe went through Istio's ztunnel"
    );
}

#[test]
fn excluded_ports_bypass_istios_ztunnel_on_our_ebpf_capture() {
    let Some(s) = setup() else { return };
    let seen = s.istio.access_log().len();
    // Outbound to an excluded port: the app's connect is left alone, the peer sees a itself.
    let before = s.cni.capture_counters().unwrap();
    let out = SocketAddr::new(s.outsider.ip4().into(), EXCLUDED_OUTBOUND_PORT);
    let r = request(&s.a, out, "excluded-out").expect("a reaches the excluded port directly");
    assert_eq!(r.peer.ip(), IpAddr::from(s.a.ip4()));
    let after = s.cni.capture_counters().unwrap();
    assert!(after.connect4.bypassed > before.connect4.bypassed, "connect4 did not bypass the excluded port");
    assert_eq!(after.connect4.captured, before.connect4.captured, "the excluded port was captured");
    // Inbound to an excluded port: the app sees the outsider directly.
    let inb = SocketAddr::new(s.a.ip4().into(), EXCLUDED_INBOUND_PORT);
    let r = request(&s.outsider, inb, "excluded-in").expect("the excluded inbound port is reached directly");
    assert_eq!(r.peer.ip(), IpAddr::from(s.outsider.ip4()));
    assert!(s.cni.capture_counters().unwrap().sk_lookup.bypassed > after.sk_lookup.bypassed);
    std::thread::sleep(Duration::from_millis(200));
    for e in s.istio.access_log().iter().skip(seen) {
        assert!(e["dst.addr"] != out.to_string() && e["dst.addr"] != inb.to_string(), "went through Istio: {e}");
    }
}

#[test]
fn an_app_listening_on_15006_in_a_captured_pod_is_not_given_its_inbound() {
    let Some(mut s) = setup() else { return };
    // The proxy is gone; an app of the pod (not in the proxy cgroup) takes its port.
    s.istio.kill();
    let before = s.cni.capture_counters().unwrap();
    let _squatter = PeerServer::start(&s.a, 15006).expect("an app listening on 15006 in the pod");
    let after = s.cni.capture_counters().unwrap();
    assert!(after.listen.bypassed > before.listen.bypassed, "the listen hook did not see (and refuse) the app");
    assert_eq!(after.listen.captured, before.listen.captured, "the app's listener was adopted");
    assert!(request(&s.outsider, app(&s.a, false), "to-squatter").is_err(), "inbound reached the app's 15006 listener");
}
