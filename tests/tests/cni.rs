//! Enrollment in Istio's direction, end to end: a node agent that connects to the CNI's ZDS
//! socket (`--inpod-uds`), `ztunnel cni` serving that socket and deciding from the
//! controller which pods are ambient, and the real binary run as the chained CNI plugin
//! exactly as a container runtime runs it. Restarts of either side reconcile; the plugin
//! answers bad input with CNI error JSON. Needs root; fails (never skips) otherwise.
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mesh_tests::agent_process::{cluster_args, ztunnel_binary, AgentProcess};
use mesh_tests::apps::{request, PeerServer};
use mesh_tests::cni::{container_id, plugin_config, pod_env, prev_result, CniNode, PluginBin, PluginRun, ZdsListener};
use mesh_tests::control_plane::{namespace_yaml, pod_yaml, ControlPlane};
use mesh_tests::mesh::{sweep_pins, wait_record, MeshNode, RUN_DIR};
use mesh_tests::{Cluster, InNetns, Pod};
use prost::Message;
use serde_json::json;
use ztunnel::cni::plugin::code;
use ztunnel::enrollment::{
    hello, recv_datagram, send_datagram, workload_request::Payload, workload_response, Ack, Version, WorkloadInfo,
    WorkloadRequest, WorkloadResponse,
};
use ztunnel::proxy::Direction;

const WAIT: Duration = Duration::from_secs(5);
const APP_PORT: u16 = 8080;

/// Retries `f` until it holds or `limit` passes; returns how long it took.
fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn uids(pods: &[&Pod]) -> Vec<String> {
    let mut v: Vec<String> = pods.iter().map(|p| p.uid().to_string()).collect();
    v.sort();
    v
}

fn info(pod: &Pod) -> WorkloadInfo {
    WorkloadInfo { name: pod.name().into(), namespace: "default".into(), service_account: pod.name().into() }
}

/// Asserts the plugin succeeded, with its output in the message otherwise.
fn ok(run: &PluginRun) -> &PluginRun {
    assert_eq!(run.code, Some(0), "plugin failed: {run:?}");
    run
}

/// Asserts the plugin failed the CNI way: error JSON with a code and a message on stdout,
/// a non-zero exit, no panic. Returns the JSON.
fn cni_error(run: &PluginRun) -> serde_json::Value {
    assert_eq!(run.code, Some(1), "expected exit 1: {run:?}");
    assert!(!run.stderr.contains("panicked"), "the plugin panicked: {run:?}");
    let e = run.json();
    assert!(e["code"].as_u64().is_some_and(|c| c > 0), "no error code: {e}");
    assert!(e["msg"].as_str().is_some_and(|m| !m.is_empty()), "no message: {e}");
    assert!(e["cniVersion"].is_string(), "no cniVersion: {e}");
    e
}

/// A one-node cluster with pods, the controller (namespace `default` ambient or not, every
/// pod on the node), `ztunnel cni` and a node agent connected to it. Fields drop in order:
/// the agent first, the cluster last.
struct Fixture {
    node: MeshNode,
    cni: CniNode,
    cp: ControlPlane,
    pods: Vec<Pod>,
    c: Cluster,
}

fn fixture(names: &[&str], ambient: bool) -> Fixture {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let pods: Vec<Pod> = names.iter().map(|n| c.add_pod(0, n).unwrap()).collect();
    let dir = ControlPlane::dir_for(&c);
    let _ = std::fs::remove_dir_all(&dir);
    mesh_tests::control_plane::write_config(&dir, "namespace.yaml", &namespace_yaml(ambient));
    let yaml: String = pods.iter().map(|p| pod_yaml(p, c.node(0).name(), p.name())).collect();
    mesh_tests::control_plane::write_config(&dir, "pods.yaml", &yaml);
    let cp = ControlPlane::start(&dir);
    let cni = CniNode::start(&c, 0, &cp.access).expect("ztunnel cni");
    let node = MeshNode::start_connecting(&c, 0, cni.zds_socket(), Some(&cp.access)).expect("node agent");
    cni.wait(WAIT, |s| s.synced && s.agents == 1).expect("cni synced with an agent connected");
    Fixture { node, cni, cp, pods, c }
}

/// Sends `from` → `to`:8080 and checks the source agent proxied it in HBONE.
fn assert_captured(node: &MeshNode, from: &Pod, to: &Pod) {
    let dst = SocketAddr::new(to.ip4().into(), APP_PORT);
    let mut ev = node.events();
    within(WAIT, || request(from, dst, "x").is_ok()).unwrap_or_else(|| panic!("{} cannot reach {dst}", from.name()));
    let rec = wait_record(&mut ev, WAIT, |r| r.direction == Direction::Outbound && r.dst == dst && r.error.is_none())
        .unwrap_or_else(|| panic!("no outbound record for {} → {dst}: not captured", from.name()));
    assert_eq!(rec.protocol, "HBONE");
}

// --- the agent in client mode, against a ZDS socket the test serves ---

#[test]
fn an_agent_in_client_mode_says_hello_then_is_enrolled_by_the_cni_side_and_captures() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let (a, b) = (c.add_pod(0, "a").unwrap(), c.add_pod(0, "b").unwrap());
    let path = PathBuf::from(RUN_DIR).join(format!("{}-node0", c.prefix())).join("cni.sock");
    // The agent starts first and waits for the socket, as after a node reboot.
    let node = MeshNode::start_connecting(&c, 0, &path, None).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let cni = ZdsListener::bind(&path).unwrap();
    let (hello, conn) = cni.accept(WAIT).unwrap();
    assert_eq!(hello.version, Version::V1 as i32, "first datagram is ZdsHello{{V1}}");
    for p in [&a, &b] {
        conn.add(p.uid(), info(p), p.netns_file()).unwrap().expect("Add acked");
    }
    conn.snapshot_sent().unwrap().expect("SnapshotSent acked");
    assert_eq!(node.agent().pods(), uids(&[&a, &b]));
    let _app = PeerServer::start(&b, APP_PORT).unwrap();
    let dst = SocketAddr::new(b.ip4().into(), APP_PORT);
    let mut ev = node.events();
    assert_eq!(request(&a, dst, "via-zds").unwrap().got, "via-zds");
    assert!(wait_record(&mut ev, WAIT, |r| r.direction == Direction::Outbound && r.dst == dst).is_some(), "captured");
}

#[test]
fn an_agent_in_client_mode_reconnects_and_releases_pods_missing_from_the_new_snapshot() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let (a, b) = (c.add_pod(0, "a").unwrap(), c.add_pod(0, "b").unwrap());
    let path = PathBuf::from(RUN_DIR).join(format!("{}-node0", c.prefix())).join("cni.sock");
    let cni = ZdsListener::bind(&path).unwrap();
    let node = MeshNode::start_connecting(&c, 0, &path, None).unwrap();
    {
        let (_, conn) = cni.accept(WAIT).unwrap();
        for p in [&a, &b] {
            conn.add(p.uid(), info(p), p.netns_file()).unwrap().unwrap();
        }
        conn.snapshot_sent().unwrap().unwrap();
    } // the CNI side restarts: the connection closes
    let (hello, conn) = cni.accept(WAIT).expect("the agent reconnects");
    assert_eq!(hello.version, Version::V1 as i32);
    conn.add(a.uid(), info(&a), a.netns_file()).unwrap().expect("a re-sent pod is acked again");
    conn.snapshot_sent().unwrap().unwrap();
    assert_eq!(node.agent().pods(), uids(&[&a]), "b was not in the new snapshot");
}

#[test]
fn ztunnel_node_with_inpod_uds_enrolls_over_the_cni_socket_and_its_uninstall_leaves_that_socket() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let a = c.add_pod(0, "a").unwrap();
    let path = PathBuf::from(RUN_DIR).join(format!("{}-zds", c.prefix())).join("ztunnel.sock");
    let cni = ZdsListener::bind(&path).unwrap();
    let extra = cluster_args(&c, Some("workloads: []\n"), &[]).unwrap();
    let agent = AgentProcess::start_connecting(ztunnel_binary(), &c, 0, &path, &extra).expect("ztunnel node");
    let (hello, conn) = cni.accept(Duration::from_secs(10)).expect("the binary connects");
    assert_eq!(hello.version, Version::V1 as i32);
    conn.add(a.uid(), info(&a), a.netns_file()).unwrap().expect("Add acked");
    conn.snapshot_sent().unwrap().expect("SnapshotSent acked");
    agent.stop_and_uninstall().unwrap();
    assert!(path.exists(), "uninstall removed the CNI's socket");
}

// --- ztunnel cni with the controller and an agent ---

#[test]
fn a_pod_in_an_ambient_namespace_is_enrolled_before_the_plugin_add_returns() {
    let f = fixture(&["client", "server"], true);
    for p in &f.pods {
        ok(&f.cni.plugin("ADD", p));
        assert!(f.node.agent().pods().contains(&p.uid().to_string()), "{} not enrolled when ADD returned", p.name());
    }
    let _app = PeerServer::start(&f.pods[1], APP_PORT).unwrap();
    assert_captured(&f.node, &f.pods[0], &f.pods[1]);
}

#[test]
fn the_plugin_add_prints_prev_result_unchanged() {
    let f = fixture(&["web"], true);
    let run = f.cni.plugin("ADD", &f.pods[0]);
    assert_eq!(ok(&run).json(), prev_result(&f.pods[0]));
}

#[test]
fn a_pod_outside_the_mesh_is_added_without_being_enrolled() {
    let f = fixture(&["plain"], false);
    ok(&f.cni.plugin("ADD", &f.pods[0]));
    assert!(f.node.agent().pods().is_empty());
    assert_eq!(f.cni.status().known, uids(&[&f.pods[0]]), "the daemon still knows it, for a later label");
}

#[test]
fn the_namespace_label_releases_running_pods_within_two_seconds_and_enrolls_them_again() {
    let f = fixture(&["client", "server"], true);
    for p in &f.pods {
        ok(&f.cni.plugin("ADD", p));
    }
    let _app = PeerServer::start(&f.pods[1], APP_PORT).unwrap();
    f.cp.write("namespace.yaml", &namespace_yaml(false));
    let released = within(Duration::from_secs(2), || f.node.agent().pods().is_empty());
    assert!(released.is_some(), "pods still enrolled 2 s after the label was removed: {:?}", f.node.agent().pods());
    f.cp.write("namespace.yaml", &namespace_yaml(true));
    let all = uids(&f.pods.iter().collect::<Vec<_>>());
    let back = within(Duration::from_secs(2), || f.node.agent().pods() == all);
    assert!(back.is_some(), "pods not enrolled again 2 s after the label came back: {:?}", f.node.agent().pods());
    assert_captured(&f.node, &f.pods[0], &f.pods[1]);
}

#[test]
fn after_an_agent_restart_the_cni_snapshot_leaves_exactly_the_live_ambient_pods_enrolled() {
    let mut f = fixture(&["a", "b", "late"], true);
    let (a, b, late) = (f.pods[0].clone(), f.pods[1].clone(), f.pods[2].clone());
    ok(&f.cni.plugin("ADD", &a));
    ok(&f.cni.plugin("ADD", &b));
    f.node.stop_agent();
    // While the agent is down: b is deleted, and late's ADD waits for an agent.
    ok(&f.cni.plugin("DEL", &b));
    let pending = {
        let env = pod_env("ADD", &late);
        let conf = plugin_config(f.cni.plugin_socket(), Some(prev_result(&late)));
        let bin = PluginBin::scratch().unwrap();
        std::thread::spawn(move || bin.run(&env, &conf))
    };
    std::thread::sleep(Duration::from_millis(300));
    f.node.start_again().unwrap();
    let late_add = pending.join().unwrap();
    ok(&late_add);
    assert_eq!(f.node.agent().pods(), uids(&[&a, &late]), "b released at SnapshotSent, late enrolled");
    let _app = PeerServer::start(&late, APP_PORT).unwrap();
    assert_captured(&f.node, &a, &late);
}

#[test]
fn after_a_cni_restart_the_agent_is_reconciled_to_the_pods_still_alive() {
    let mut f = fixture(&["a", "b", "gone"], true);
    let gone = f.pods[2].clone();
    for p in &f.pods {
        ok(&f.cni.plugin("ADD", p));
    }
    f.cni.stop();
    // Deleted while the daemon is down: its DEL cannot reach the daemon (and succeeds).
    ok(&f.cni.plugin("DEL", &gone));
    f.c.remove_pod(&gone).unwrap();
    f.cni.start_again().unwrap();
    let want = uids(&[&f.pods[0], &f.pods[1]]);
    let reconciled = within(WAIT, || f.node.agent().pods() == want);
    assert!(reconciled.is_some(), "agent holds {:?}, want {want:?}", f.node.agent().pods());
    assert_eq!(f.cni.status().known, want, "the daemon forgot the pod whose netns is gone");
    let _app = PeerServer::start(&f.pods[1], APP_PORT).unwrap();
    assert_captured(&f.node, &f.pods[0], &f.pods[1]);
}

/// A CNI daemon with one ambient pod and, instead of a node agent, a bare ZDS peer the test
/// drives by hand: it has sent its hello; requests are read and acked one by one.
struct BareAgent {
    pod: Pod,
    cni: CniNode,
    agent: std::os::fd::OwnedFd,
    _cp: ControlPlane,
    _c: Cluster,
}

impl BareAgent {
    fn start() -> BareAgent {
        sweep_pins();
        let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
        let pod = c.add_pod(0, "web").unwrap();
        let dir = ControlPlane::dir_for(&c);
        let _ = std::fs::remove_dir_all(&dir);
        mesh_tests::control_plane::write_config(&dir, "namespace.yaml", &namespace_yaml(true));
        mesh_tests::control_plane::write_config(&dir, "pods.yaml", &pod_yaml(&pod, c.node(0).name(), "web"));
        let cp = ControlPlane::start(&dir);
        let cni = CniNode::start(&c, 0, &cp.access).unwrap();
        let agent = ztunnel::enrollment::socket::connect(cni.zds_socket(), false).unwrap();
        let step = nix::sys::time::TimeVal::new(10, 0);
        nix::sys::socket::setsockopt(&agent, nix::sys::socket::sockopt::ReceiveTimeout, &step).unwrap();
        send_datagram(agent.as_raw_fd(), &hello(), &[]).unwrap();
        BareAgent { pod, cni, agent, _cp: cp, _c: c }
    }

    /// The next request and the fds that came with it.
    fn recv(&self) -> (Payload, Vec<std::os::fd::OwnedFd>) {
        let d = recv_datagram(self.agent.as_raw_fd()).unwrap();
        (WorkloadRequest::decode(d.bytes.as_slice()).unwrap().payload.unwrap(), d.fds)
    }

    fn ack(&self) {
        let resp = WorkloadResponse { payload: Some(workload_response::Payload::Ack(Ack { error: String::new() })) };
        send_datagram(self.agent.as_raw_fd(), &resp.encode_to_vec(), &[]).unwrap();
    }

    /// Runs the plugin for the pod on its own thread, as the runtime would.
    fn plugin(&self, command: &str) -> std::thread::JoinHandle<PluginRun> {
        let env = pod_env(command, &self.pod);
        let conf = plugin_config(self.cni.plugin_socket(), Some(prev_result(&self.pod)));
        let bin = PluginBin::scratch().unwrap();
        std::thread::spawn(move || bin.run(&env, &conf))
    }
}

#[test]
fn the_cni_speaks_zds_hello_first_then_snapshot_sent_then_adds_with_the_netns_fd() {
    let a = BareAgent::start();
    let (first, fds) = a.recv();
    assert!(matches!(first, Payload::SnapshotSent(_)) && fds.is_empty(), "empty snapshot: {first:?}");
    a.ack();
    let add = a.plugin("ADD");
    let (req, fds) = a.recv();
    let Payload::Add(add_req) = req else { panic!("expected Add, got {req:?}") };
    assert_eq!(add_req.uid, a.pod.uid());
    assert_eq!(add_req.workload_info, Some(info(&a.pod)));
    assert_eq!(fds.len(), 1, "exactly one fd");
    assert_eq!(inode(&fds[0]), inode(a.pod.netns_file()), "the fd is the pod's netns");
    a.ack();
    ok(&add.join().unwrap());
}

#[test]
fn plugin_del_returns_only_after_the_agent_acked_the_del() {
    let a = BareAgent::start();
    assert!(matches!(a.recv().0, Payload::SnapshotSent(_)));
    a.ack();
    let add = a.plugin("ADD");
    assert!(matches!(a.recv().0, Payload::Add(_)));
    a.ack();
    ok(&add.join().unwrap());
    let del = a.plugin("DEL");
    let req = a.recv().0;
    assert!(matches!(&req, Payload::Del(d) if d.uid == a.pod.uid()), "expected Del, got {req:?}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!del.is_finished(), "DEL returned while the agent still held the pod");
    a.ack();
    ok(&del.join().unwrap());
}

fn inode(fd: impl std::os::fd::AsFd) -> u64 {
    nix::sys::stat::fstat(fd).unwrap().st_ino
}

// --- the plugin's answers ---

#[test]
fn plugin_check_passes_for_an_enrolled_pod_and_fails_once_it_is_deleted() {
    let f = fixture(&["web"], true);
    let pod = &f.pods[0];
    ok(&f.cni.plugin("ADD", pod));
    ok(&f.cni.plugin("CHECK", pod));
    ok(&f.cni.plugin("DEL", pod));
    let e = cni_error(&f.cni.plugin("CHECK", pod));
    assert_eq!(e["code"], code::ENROLLMENT);
}

#[test]
fn plugin_del_releases_the_pod_and_a_repeated_del_still_succeeds() {
    let f = fixture(&["web"], true);
    let pod = &f.pods[0];
    ok(&f.cni.plugin("ADD", pod));
    ok(&f.cni.plugin("DEL", pod));
    assert!(f.node.agent().pods().is_empty(), "released");
    assert!(f.cni.status().known.is_empty(), "forgotten");
    let again = f.cni.plugin("DEL", pod);
    assert_eq!(ok(&again).stdout, "", "DEL prints nothing");
}

#[test]
fn plugin_add_fails_when_an_ambient_pod_has_no_agent_to_enroll_it() {
    let mut f = fixture(&["web"], true);
    f.node.stop_agent();
    f.cni.wait(WAIT, |s| s.agents == 0).unwrap();
    let e = cni_error(&f.cni.plugin("ADD", &f.pods[0]));
    assert_eq!(e["code"], code::ENROLLMENT);
    assert!(e["details"].as_str().unwrap().contains("no node agent is connected"), "{e}");
    assert!(f.cni.status().known.is_empty(), "a failed ADD leaves no record");
}

fn scratch_env(command: &str) -> Vec<(String, String)> {
    vec![
        ("CNI_COMMAND".into(), command.into()),
        ("CNI_CONTAINERID".into(), "abc123".into()),
        ("CNI_NETNS".into(), "/proc/self/ns/net".into()),
        ("CNI_IFNAME".into(), "eth0".into()),
        ("CNI_ARGS".into(), "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=u-1".into()),
        ("CNI_PATH".into(), "/opt/cni/bin".into()),
    ]
}

fn nowhere() -> PathBuf {
    PathBuf::from(RUN_DIR).join(format!("zt{}x-no-daemon", std::process::id())).join("plugin.sock")
}

#[test]
fn plugin_malformed_config_is_a_cni_decode_error() {
    let bin = PluginBin::scratch().unwrap();
    let e = cni_error(&bin.run(&scratch_env("ADD"), "{\"cniVersion\": \"1.0.0\", "));
    assert_eq!(e["code"], code::DECODE);
}

#[test]
fn plugin_add_without_cni_netns_is_a_cni_error() {
    let bin = PluginBin::scratch().unwrap();
    let env: Vec<_> = scratch_env("ADD").into_iter().filter(|(k, _)| k != "CNI_NETNS").collect();
    let e = cni_error(&bin.run(&env, &plugin_config(&nowhere(), None)));
    assert_eq!(e["code"], code::INVALID_ENVIRONMENT);
    assert_eq!(e["msg"], "CNI_NETNS is not set");
}

#[test]
fn plugin_unknown_command_is_a_cni_error() {
    let bin = PluginBin::scratch().unwrap();
    let e = cni_error(&bin.run(&scratch_env("FROBNICATE"), &plugin_config(&nowhere(), None)));
    assert_eq!(e["code"], code::INVALID_ENVIRONMENT);
}

#[test]
fn plugin_add_fails_when_the_daemon_is_unreachable() {
    let bin = PluginBin::scratch().unwrap();
    let e = cni_error(&bin.run(&scratch_env("ADD"), &plugin_config(&nowhere(), Some(json!({"cniVersion": "1.0.0"})))));
    assert_eq!(e["code"], code::TRY_AGAIN_LATER);
}

#[test]
fn plugin_del_succeeds_when_the_daemon_is_unreachable() {
    let bin = PluginBin::scratch().unwrap();
    let run = bin.run(&scratch_env("DEL"), &plugin_config(&nowhere(), None));
    assert_eq!(ok(&run).stdout, "");
}

#[test]
fn plugin_version_lists_the_supported_versions() {
    let bin = PluginBin::scratch().unwrap();
    let run = bin.run(&[("CNI_COMMAND".into(), "VERSION".into())], "{\"cniVersion\":\"1.0.0\"}");
    let v = ok(&run).json();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"]));
}

#[test]
fn the_cni_plugin_subcommand_answers_like_the_installed_plugin() {
    use std::io::Write;
    let mut child = std::process::Command::new(mesh_tests::agent_process::ztunnel_binary())
        .args(["cni", "plugin"])
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"{\"cniVersion\":\"0.4.0\"}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "0.4.0", "stdout holds only the result: {out:?}");
}

#[test]
fn the_container_id_names_the_pod_for_del_when_the_uid_is_missing() {
    let f = fixture(&["web"], true);
    let pod = &f.pods[0];
    ok(&f.cni.plugin("ADD", pod));
    let env: Vec<(String, String)> = pod_env("DEL", pod)
        .into_iter()
        .map(|(k, v)| if k == "CNI_ARGS" { (k, String::new()) } else { (k, v) })
        .collect();
    let bin = PluginBin::scratch().unwrap();
    ok(&bin.run(&env, &plugin_config(f.cni.plugin_socket(), None)));
    assert!(f.node.agent().pods().is_empty(), "released by container id {}", container_id(pod));
}
