//! Istio's own ztunnel in shared (in-pod) mode, enrolled by OUR `ztunnel cni` over ZDS
//! (issue 9, deliverable 2a): the pairing a cluster gets when it keeps Istio's ztunnel and
//! swaps istio-cni for ours. On node 1, `ztunnel cni` learns from our controller which pods
//! are ambient and serves the ZDS socket Istio's ztunnel connects to (`INPOD_UDS`); the real
//! CNI plugin ADD / DEL and the namespace label drive enrollment. Istio's ztunnel reads its
//! workloads from a local config and signs with `FAKE_CA`; istio-cni's in-pod iptables rules
//! (the fixtures' golden files) capture the pods' traffic, installed before the ADD as
//! istio-cni installs them. On node 0, our agent serves one pod with eBPF capture and
//! certificates from the same `FAKE_CA` root. Without the peer binary the tests print one
//! line and return.
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mesh_tests::apps::{request, PeerServer};
use mesh_tests::cni::{CniNode, PluginRun};
use mesh_tests::control_plane::{namespace_yaml, ControlPlane};
use mesh_tests::forward::PortForward;
use mesh_tests::istio::{
    install_istio_cni_rules, listening_ports, local_config, peer_or_skip, write_fake_ca_plugin_dir, IstioZtunnel,
    TempDir,
};
use mesh_tests::mesh::{sweep_pins, wait_record, write_mesh_config, MeshNode};
use mesh_tests::{Cluster, Pod};
use serde_json::Value;
use ztunnel::proxy::{ConnectionRecord, Direction};

const WAIT: Duration = Duration::from_secs(5);
const APP_PORT: u16 = 8080;
/// The in-pod listeners Istio's ztunnel opens for each pod it serves: outbound, inbound
/// plaintext, HBONE.
const INPOD_PORTS: [u16; 3] = [15001, 15006, 15008];

fn id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// The two nodes. Fields drop in order: Istio's ztunnel, the apps, our CNI, our agent, the
/// controller, then the cluster and the CA files.
struct Shared {
    istio: IstioZtunnel,
    _apps: Vec<PeerServer>,
    cni: CniNode,
    agent: MeshNode,
    cp: ControlPlane,
    /// On node 0, served by our agent.
    ours: Pod,
    /// On node 1, to be enrolled by our CNI into Istio's ztunnel.
    a: Pod,
    b: Pod,
    /// Istio's ztunnel binary and local config, to start it again.
    binary: PathBuf,
    config: String,
    _forward: Option<PortForward>,
    cluster: Cluster,
    _ca: TempDir,
}

/// Where both sides get their certificates.
#[derive(Clone, Copy, PartialEq)]
enum Ca {
    /// Istio's public `FAKE_CA` root: Istio's ztunnel signs itself, ours from plug-in files.
    Fake,
    /// Our controller's CA for both: Istio's ztunnel over `CA_ADDRESS` (CSR, node token),
    /// our agent over xDS and the same CA.
    Controller,
    /// As `Controller`, and Istio's ztunnel takes its workloads and policies from our
    /// controller's delta ADS (`XDS_ADDRESS`) instead of a local config.
    ControllerXds,
}

/// Builds both nodes with every app listening and nothing on node 1 enrolled yet; `None`
/// (after one printed line) when Istio's ztunnel is not available.
fn shared() -> Option<Shared> {
    shared_with(Ca::Fake)
}

fn shared_with(ca_mode: Ca) -> Option<Shared> {
    let binary = peer_or_skip()?;
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let ours = c.add_pod(0, "ours").unwrap();
    let (a, b) = (c.add_pod(1, "a").unwrap(), c.add_pod(1, "b").unwrap());
    let config = local_config(&[&ours, &a, &b]);
    let ca = TempDir::new(&format!("{}-istio-fake-ca", c.prefix())).unwrap();
    write_fake_ca_plugin_dir(ca.path()).unwrap();
    let cp = ControlPlane::start_ambient(&c, &[(&a, 1), (&b, 1), (&ours, 0)]);
    let mut env: Vec<(&str, String)> = vec![];
    let mut forward = None;
    let agent = match ca_mode {
        Ca::Fake => {
            let agent = MeshNode::start_with_plugin_ca(&c, 0, ca.path()).unwrap();
            write_mesh_config(&c, &config, &[&agent]).unwrap();
            agent
        }
        Ca::Controller | Ca::ControllerXds => {
            // Istio's ztunnel reaches the controller on the node's loopback, as a pod reaches
            // istiod through its Service.
            let fwd = PortForward::start(c.node(1), "127.0.0.1:15012".parse().unwrap(), cp.access.address).unwrap();
            forward = Some(fwd);
            let root = ca.path().join("controller-root.pem");
            std::fs::write(&root, &cp.access.root_pem).unwrap();
            env.push(("FAKE_CA", "false".into()));
            env.push(("CA_ADDRESS", "https://127.0.0.1:15012".into()));
            env.push(("CA_ROOT_CA", root.display().to_string()));
            env.push(("AUTH_TOKEN", cp.access.tokens_dir.join(c.node(1).name()).display().to_string()));
            if ca_mode == Ca::ControllerXds {
                env.push(("XDS_ADDRESS", "https://127.0.0.1:15012".into()));
                env.push(("XDS_ROOT_CA", root.display().to_string()));
                env.push(("LOCAL_XDS_PATH", String::new()));
                env.push(("NODE_NAME", c.node(1).name().to_string()));
                env.push(("RUST_LOG", std::env::var("ISTIO_LOG").unwrap_or_else(|_| "info".into())));
            }
            MeshNode::start_with_control_plane(&c, 0, &cp.access).unwrap()
        }
    };
    agent.enroll_as(&ours, "default", ours.name()).unwrap();
    let cni = CniNode::start(&c, 1, &cp.access).expect("ztunnel cni on node 1");
    let istio_dir = format!("{}-istio-shared", c.prefix());
    let istio = IstioZtunnel::start_shared_with(&binary, c.node(1), None, cni.zds_socket(), &config, &istio_dir, &env)
        .expect("Istio's ztunnel in shared mode, connected to our CNI");
    cni.wait(WAIT, |s| s.synced && s.agents == 1).expect("our CNI synced with Istio's ztunnel connected");
    let apps = [&ours, &a, &b].iter().map(|p| PeerServer::start(p, APP_PORT).unwrap()).collect();
    Some(Shared {
        istio,
        _apps: apps,
        cni,
        agent,
        cp,
        ours,
        a,
        b,
        binary,
        config,
        cluster: c,
        _ca: ca,
        _forward: forward,
    })
}

impl Shared {
    /// What istio-cni does for a new ambient pod, with our CNI in its place: its in-pod
    /// iptables rules first, then the real plugin ADD, which returns once Istio's ztunnel
    /// acked the Add.
    fn enroll(&self, pod: &Pod) {
        install_istio_cni_rules(pod).unwrap();
        ok(&self.cni.plugin("ADD", pod));
    }

    /// Kills Istio's ztunnel as a crash would and starts a new one on the same ZDS socket;
    /// returns once the new one is ready (it has had our CNI's snapshot).
    fn restart_istio(&mut self) {
        self.istio.kill();
        let dir = format!("{}-istio-shared-again", self.cluster.prefix());
        self.istio =
            IstioZtunnel::start_shared(&self.binary, self.cluster.node(1), self.cni.zds_socket(), &self.config, &dir)
                .expect("Istio's ztunnel started again");
    }

    /// Istio's ztunnel's view of `pod` (its `workloadState` entry), if it holds it.
    fn istio_state(&self, pod: &Pod) -> Option<Value> {
        let dump = self.istio.config_dump().expect("Istio's admin /config_dump");
        dump["workloadState"].get(pod.uid()).cloned()
    }
}

fn ok(run: &PluginRun) -> &PluginRun {
    assert_eq!(run.code, Some(0), "plugin failed: {run:?}");
    run
}

fn inpod_ports() -> BTreeSet<u16> {
    INPOD_PORTS.into_iter().collect()
}

/// The in-pod listener ports open in `pod`'s netns.
fn open_inpod_ports(pod: &Pod) -> BTreeSet<u16> {
    let all = listening_ports(pod).expect("reading the pod's listening sockets");
    all.intersection(&inpod_ports()).copied().collect()
}

/// Waits up to `limit` for `f`; whether it held.
fn within(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An access-log entry of Istio's ztunnel for a finished connection in `direction`.
fn completed(entry: &Value, direction: &str) -> bool {
    entry["message"] == "connection complete" && entry["direction"] == direction
}

fn app(pod: &Pod, v6: bool) -> SocketAddr {
    let ip: IpAddr = if v6 { pod.ip6().into() } else { pod.ip4().into() };
    SocketAddr::new(ip, APP_PORT)
}

fn starts_with_ip(addr: &Value, ip: IpAddr) -> bool {
    let s = addr.as_str().unwrap_or_default();
    s.starts_with(&format!("{ip}:")) || s.starts_with(&format!("[{ip}]:"))
}

/// `from` (enrolled into Istio's ztunnel by our CNI) → our pod at `dst`: the reply comes
/// back, our inbound record shows `from`'s identity over mTLS from `from`'s address, and
/// Istio's outbound log shows our pod's verified identity.
fn assert_istio_pod_reaches_ours(s: &Shared, from: &Pod, v6: bool) {
    let dst = app(&s.ours, v6);
    let (mut events, seen) = (s.agent.events(), s.istio.access_log().len());
    let reply = request(from, dst, "hello-ours").expect("the pod enrolled into Istio's ztunnel reaches our pod");
    assert_eq!(reply.got, "hello-ours", "our app got the bytes");
    let inb = wait_record(&mut events, WAIT, |r: &ConnectionRecord| r.direction == Direction::Inbound && r.dst == dst)
        .expect("our inbound record");
    assert_eq!((inb.protocol, inb.error.as_deref()), ("HBONE", None), "{inb:?}");
    assert_eq!(inb.src_identity.as_deref(), Some(id(from.name()).as_str()), "we verified Istio's client certificate");
    assert_eq!(inb.dst_identity.as_deref(), Some(id("ours").as_str()));
    let from_ip: IpAddr = if v6 { from.ip6().into() } else { from.ip4().into() };
    assert_eq!(inb.src.ip(), from_ip, "the tunnel came from the enrolled pod's own address");
    let entry = s
        .istio
        .wait_access_log(seen, WAIT, |e| completed(e, "outbound") && e["dst.identity"] == id("ours"))
        .expect("Istio's ztunnel logged our pod's verified identity");
    assert_eq!(entry["src.identity"], id(from.name()), "{entry}");
    assert_eq!(entry["dst.hbone_addr"], dst.to_string(), "{entry}");
    assert!(entry.get("error").is_none(), "{entry}");
}

#[test]
fn istios_shared_ztunnel_accepts_our_cnis_add_and_opens_the_pods_listeners_inside_its_netns() {
    let Some(s) = shared() else { return };
    assert!(open_inpod_ports(&s.a).is_empty(), "listeners before enrollment");
    s.enroll(&s.a);
    assert!(s.cni.status().enrolled.contains(&s.a.uid().to_string()), "our CNI has no ack: {:?}", s.cni.status());
    let state = s.istio_state(&s.a).unwrap_or_else(|| panic!("Istio's ztunnel does not hold {}", s.a.uid()));
    assert_eq!(state["state"], "Up", "{state}");
    assert_eq!(state["info"]["name"], s.a.name(), "{state}");
    assert_eq!(state["info"]["namespace"], "default", "{state}");
    assert_eq!(state["info"]["serviceAccount"], s.a.name(), "{state}");
    assert_eq!(open_inpod_ports(&s.a), inpod_ports(), "Istio's listeners in the pod's netns");
    assert!(open_inpod_ports(&s.b).is_empty(), "a pod not added got listeners");
    let node_ports = listening_ports(s.cluster.node(1)).unwrap();
    assert!(node_ports.is_disjoint(&inpod_ports()), "in-pod listeners opened in the node's netns: {node_ports:?}");
}

#[test]
fn a_pod_our_cni_enrolled_into_istios_shared_ztunnel_reaches_our_pod_over_hbone() {
    let Some(s) = shared() else { return };
    s.enroll(&s.a);
    assert_istio_pod_reaches_ours(&s, &s.a, false);
}

#[test]
fn a_pod_our_cni_enrolled_into_istios_shared_ztunnel_reaches_our_pod_over_ipv6() {
    let Some(s) = shared() else { return };
    s.enroll(&s.a);
    assert_istio_pod_reaches_ours(&s, &s.a, true);
}

#[test]
fn our_pod_reaches_a_pod_our_cni_enrolled_into_istios_shared_ztunnel_over_hbone() {
    let Some(s) = shared() else { return };
    s.enroll(&s.b);
    let dst = app(&s.b, false);
    let (mut events, seen) = (s.agent.events(), s.istio.access_log().len());
    let reply = request(&s.ours, dst, "hello-b").expect("our pod reaches the enrolled pod");
    assert_eq!(reply.got, "hello-b");
    let out = wait_record(&mut events, WAIT, |r: &ConnectionRecord| r.direction == Direction::Outbound && r.dst == dst)
        .expect("our outbound record");
    assert_eq!((out.protocol, out.error.as_deref()), ("HBONE", None), "{out:?}");
    assert_eq!(out.dst_identity.as_deref(), Some(id("b").as_str()), "we verified the certificate Istio serves for b");
    let entry = s
        .istio
        .wait_access_log(seen, WAIT, |e| completed(e, "inbound") && e["src.identity"] == id("ours"))
        .expect("Istio's ztunnel logged our client's verified identity");
    assert_eq!(entry["dst.identity"], id("b"), "{entry}");
    assert_eq!(entry["dst.hbone_addr"], dst.to_string(), "{entry}");
    assert!(starts_with_ip(&entry["src.addr"], s.ours.ip4().into()), "not from our pod: {entry}");
    assert!(entry.get("error").is_none(), "{entry}");
}

#[test]
fn two_pods_our_cni_enrolled_reach_each_other_through_istios_shared_ztunnel_over_hbone() {
    let Some(s) = shared() else { return };
    s.enroll(&s.a);
    s.enroll(&s.b);
    let dst = app(&s.b, false);
    let seen = s.istio.access_log().len();
    assert_eq!(request(&s.a, dst, "a-to-b").expect("a reaches b").got, "a-to-b");
    let is_a_to_b = |e: &Value| e["src.identity"] == id("a") && e["dst.identity"] == id("b");
    for direction in ["outbound", "inbound"] {
        let entry = s
            .istio
            .wait_access_log(seen, WAIT, |e| completed(e, direction) && is_a_to_b(e))
            .unwrap_or_else(|e| panic!("no {direction} entry a -> b with both identities: {e:#}"));
        assert_eq!(entry["dst.hbone_addr"], dst.to_string(), "{entry}");
        assert!(entry.get("error").is_none(), "{entry}");
    }
}

#[test]
fn plugin_del_from_our_cni_makes_istios_shared_ztunnel_close_the_pods_listeners() {
    let Some(s) = shared() else { return };
    s.enroll(&s.a);
    assert_eq!(open_inpod_ports(&s.a), inpod_ports());
    ok(&s.cni.plugin("DEL", &s.a));
    assert!(s.cni.status().enrolled.is_empty(), "our CNI still counts it enrolled: {:?}", s.cni.status());
    let closed = within(WAIT, || open_inpod_ports(&s.a).is_empty());
    assert!(closed, "Istio's listeners still open after DEL: {:?}", open_inpod_ports(&s.a));
    assert!(within(WAIT, || s.istio_state(&s.a).is_none()), "Istio's ztunnel still holds the pod");
}

#[test]
fn removing_the_ambient_label_makes_istios_shared_ztunnel_close_the_pods_listeners_and_restoring_it_reopens_them() {
    let Some(s) = shared() else { return };
    s.enroll(&s.a);
    s.cp.write("namespace.yaml", &namespace_yaml(false));
    let closed = within(WAIT, || open_inpod_ports(&s.a).is_empty());
    assert!(closed, "listeners still open after the label was removed: {:?}", open_inpod_ports(&s.a));
    assert!(s.istio_state(&s.a).is_none(), "Istio's ztunnel still holds the pod");
    s.cp.write("namespace.yaml", &namespace_yaml(true));
    let reopened = within(WAIT, || open_inpod_ports(&s.a) == inpod_ports());
    assert!(reopened, "listeners not back after the label returned: {:?}", open_inpod_ports(&s.a));
    assert_istio_pod_reaches_ours(&s, &s.a, false);
}

#[test]
fn after_istios_shared_ztunnel_restarts_our_cni_enrolls_its_pods_again_and_they_reach_our_pod() {
    let Some(mut s) = shared() else { return };
    s.enroll(&s.a);
    s.restart_istio();
    let reopened = within(WAIT, || open_inpod_ports(&s.a) == inpod_ports());
    assert!(reopened, "listeners not reopened by the new ztunnel: {:?}\n{}", open_inpod_ports(&s.a), s.istio.log());
    assert_eq!(s.istio_state(&s.a).map(|v| v["state"].clone()), Some("Up".into()));
    assert_eq!(s.cni.status().enrolled, vec![s.a.uid().to_string()], "our CNI counts it on the new agent");
    assert_istio_pod_reaches_ours(&s, &s.a, false);
}

#[test]
fn after_our_cni_restarts_istios_shared_ztunnel_reconnects_and_keeps_serving_the_live_pods() {
    let Some(mut s) = shared() else { return };
    s.enroll(&s.a);
    s.cni.stop();
    s.cni.start_again().unwrap();
    let a = s.a.uid().to_string();
    s.cni
        .wait(Duration::from_secs(10), |st| st.agents == 1 && st.enrolled == [a.clone()])
        .expect("Istio's ztunnel reconnected and was sent the pod");
    assert_eq!(open_inpod_ports(&s.a), inpod_ports(), "the pod's listeners stayed open");
    assert_eq!(s.istio_state(&s.a).map(|v| v["state"].clone()), Some("Up".into()));
    assert_istio_pod_reaches_ours(&s, &s.a, false);
}

#[test]
fn after_our_cni_restarts_its_snapshot_makes_istios_shared_ztunnel_release_a_pod_deleted_meanwhile() {
    let Some(mut s) = shared() else { return };
    s.enroll(&s.a);
    s.enroll(&s.b);
    assert_eq!(s.istio_state(&s.b).map(|v| v["state"].clone()), Some("Up".into()));
    s.cni.stop();
    // b goes away while our CNI is down: its DEL cannot reach the daemon, and its netns is removed.
    ok(&s.cni.plugin("DEL", &s.b));
    let gone = s.b.clone();
    s.cluster.remove_pod(&gone).unwrap();
    s.cni.start_again().unwrap();
    let a = s.a.uid().to_string();
    s.cni
        .wait(Duration::from_secs(10), |st| st.agents == 1 && st.enrolled == [a.clone()])
        .expect("reconnected, snapshot sent");
    let released = within(WAIT, || s.istio_state(&gone).is_none());
    assert!(released, "Istio's ztunnel still holds the deleted pod after SnapshotSent");
    // Our handle on b's netns outlives its name: its listeners must be closed.
    assert!(within(WAIT, || open_inpod_ports(&gone).is_empty()), "b's listeners still open");
    assert_eq!(open_inpod_ports(&s.a), inpod_ports(), "a kept its listeners");
}

#[test]
fn istios_ztunnel_and_ours_trust_each_other_with_certificates_from_our_controllers_ca() {
    let Some(s) = shared_with(Ca::Controller) else { return };
    s.enroll(&s.a);
    // a (Istio's ztunnel, certificate by CSR to our controller) -> ours (our agent, same CA).
    assert_istio_pod_reaches_ours(&s, &s.a, false);
    // And back: our pod -> a, Istio's ztunnel presenting the controller-signed certificate.
    let dst = app(&s.a, false);
    let mut events = s.agent.events();
    assert_eq!(request(&s.ours, dst, "hello-a").expect("our pod reaches a").got, "hello-a");
    let out = wait_record(&mut events, WAIT, |r: &ConnectionRecord| r.direction == Direction::Outbound && r.dst == dst)
        .expect("our outbound record");
    assert_eq!((out.protocol, out.error.as_deref()), ("HBONE", None), "{out:?}");
    assert_eq!(out.dst_identity.as_deref(), Some(id("a").as_str()));
    let issued = s.cp.controller().ca().issued_total();
    assert!(issued >= 2, "the controller signed both sides' certificates (issued {issued})");
}

#[test]
fn istios_ztunnel_runs_on_our_controllers_xds_and_ca() {
    let Some(s) = shared_with(Ca::ControllerXds) else { return };
    s.enroll(&s.a);
    assert_istio_pod_reaches_ours(&s, &s.a, false);
    let dump = s.istio.config_dump().expect("Istio's admin /config_dump");
    let ours = dump["workloads"].as_array().into_iter().flatten().any(|w| w["name"] == "ours");
    assert!(ours, "Istio's ztunnel learned our pod's workload from our controller: {}", dump["workloads"]);
}
