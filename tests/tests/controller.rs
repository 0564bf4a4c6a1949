//! The control plane end to end on the mini-cluster: node agents that start with no local
//! config get workloads, services and policies from `ztunnel controller` over delta ADS and
//! their certificates from its CA; edits to the YAML directory change live behaviour within
//! 2 s; with the controller gone, traffic keeps flowing on the last state.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_tests::apps::{request, PeerServer};
use mesh_tests::control_plane::{namespace_yaml, pod_yaml, write_config as write, ControlPlane};
use mesh_tests::mesh::{sweep_pins, wait_record, MeshNode};
use mesh_tests::{Cluster, Pod};
use ztunnel::proxy::Direction;

const WAIT: Duration = Duration::from_secs(5);
const VIP: &str = "10.96.7.10";

struct Mesh {
    _c: Cluster,
    n0: MeshNode,
    n1: MeshNode,
    cp: ControlPlane,
    client: Pod,
    server: Pod,
    _app: PeerServer,
}

fn mesh() -> Mesh {
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let dir = ControlPlane::dir_for(&c);
    let _ = std::fs::remove_dir_all(&dir);
    write(&dir, "namespace.yaml", &namespace_yaml(true));
    let pods = pod_yaml(&client, c.node(0).name(), "client") + &pod_yaml(&server, c.node(1).name(), "server");
    write(&dir, "pods.yaml", &pods);
    write(
        &dir,
        "service.yaml",
        &format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: server\n  namespace: default\nspec:\n  clusterIP: {VIP}\n  selector:\n    app: server\n  ports:\n  - port: 80\n    targetPort: 8080\n"),
    );
    let cp = ControlPlane::start(&dir);
    let errors: Vec<String> =
        cp.controller().status().iter().filter(|e| e.outcome.is_error()).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    let n0 = MeshNode::start_with_control_plane(&c, 0, &cp.access).unwrap();
    let n1 = MeshNode::start_with_control_plane(&c, 1, &cp.access).unwrap();
    n0.enroll_as(&client, "default", "client").unwrap();
    n1.enroll_as(&server, "default", "server").unwrap();
    let app = PeerServer::start(&server, 8080).unwrap();
    Mesh { _c: c, n0, n1, cp, client, server, _app: app }
}

/// Retries `f` until it holds or `limit` passes; returns how long it took.
fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), 80)
}

#[test]
fn agents_started_empty_get_state_and_certificates_from_the_controller_and_carry_hbone() {
    let m = mesh();
    let mut ev = m.n0.events();
    within(WAIT, || request(&m.client, vip(), "x").is_ok()).expect("service reachable once synced");
    let r = request(&m.client, vip(), "through-the-vip").unwrap();
    assert_eq!(r.got, "through-the-vip");
    let rec = wait_record(&mut ev, WAIT, |r| r.direction == Direction::Outbound && r.dst == vip() && r.error.is_none())
        .expect("outbound record");
    assert_eq!(rec.protocol, "HBONE");
    assert_eq!(rec.dst_identity.as_deref(), Some("spiffe://cluster.local/ns/default/sa/server"));
    assert!(m.cp.controller().ca().issued_total() >= 2, "certificates came from the controller's CA");
    assert!(m.cp.controller().ads().connected_clients() >= 2);
}

#[test]
fn a_deny_policy_added_to_the_directory_applies_within_two_seconds() {
    let m = mesh();
    within(WAIT, || request(&m.client, vip(), "x").is_ok()).expect("allowed before the policy");
    write(
        &m.cp.dir,
        "deny.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  namespace: default\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/client\"]\n",
    );
    let took = within(Duration::from_secs(2), || request(&m.client, vip(), "x").is_err());
    assert!(took.is_some(), "the DENY was not in force within 2 s");
    let dump = m.n1.agent().state().snapshot();
    assert!(dump.config.policies.iter().any(|p| p.name == "deny-client"));
}

#[test]
fn removing_the_ambient_label_turns_the_pods_into_plain_tcp_within_two_seconds() {
    let m = mesh();
    let mut ev = m.n0.events();
    within(WAIT, || request(&m.client, vip(), "x").is_ok()).expect("reachable");
    write(&m.cp.dir, "namespace.yaml", &namespace_yaml(false));
    let dst = SocketAddr::new(m.server.ip4().into(), 8080);
    let took = within(Duration::from_secs(2), || {
        request(&m.client, dst, "x").is_ok()
            && wait_record(&mut ev, WAIT, |r| r.direction == Direction::Outbound && r.dst == dst)
                .is_some_and(|r| r.protocol == "TCP")
    });
    assert!(took.is_some(), "the server was still reached in HBONE 2 s after the label was removed");
}

#[test]
fn with_the_controller_stopped_traffic_flows_and_a_restart_resyncs_the_same_state() {
    let mut m = mesh();
    within(WAIT, || request(&m.client, vip(), "x").is_ok()).expect("reachable");
    let before = m.n0.agent().state().snapshot().config.workloads.len();
    m.cp.stop();
    for i in 0..5 {
        assert!(request(&m.client, vip(), "controller-away").is_ok(), "request {i} failed without the controller");
    }
    m.cp.restart();
    let model = m.cp.controller().model();
    let synced = within(WAIT, || {
        let snap = m.n0.agent().state().snapshot();
        let mut uids: Vec<&str> = snap.config.workloads.iter().map(|w| w.uid.as_str()).collect();
        uids.sort();
        uids == model.workloads.keys().map(String::as_str).collect::<Vec<_>>()
            && m.cp.controller().ads().connected_clients() >= 2
    });
    assert!(synced.is_some(), "agents did not resync to the controller's view");
    assert_eq!(m.n0.agent().state().snapshot().config.workloads.len(), before, "nothing stale or doubled");
    assert!(request(&m.client, vip(), "after-restart").is_ok());
}

#[test]
fn a_node_cannot_obtain_a_certificate_for_a_pod_that_is_not_scheduled_on_it() {
    let mut m = mesh();
    // A pod on node 1 enrolled as the client's service account, which only node 0 runs.
    // The control plane describes it (its own account, "stray"), so only the CA stops it.
    let stray = m._c.add_pod(1, "stray").unwrap();
    let pods = pod_yaml(&m.client, m._c.node(0).name(), "client")
        + &pod_yaml(&m.server, m._c.node(1).name(), "server")
        + &pod_yaml(&stray, m._c.node(1).name(), "stray");
    write(&m.cp.dir, "pods.yaml", &pods);
    let dst = SocketAddr::new(m.server.ip4().into(), 8080);
    within(WAIT, || request(&m.client, dst, "x").is_ok()).expect("reachable");
    within(WAIT, || m.n1.agent().state().snapshot().pod_workload("default", stray.name()).is_some())
        .expect("the stray pod's workload reached node 1");
    m.n1.enroll_as(&stray, "default", "client").unwrap();
    assert!(request(&stray, dst, "x").is_err(), "the stray pod got a certificate it may not hold");
    let refused = within(WAIT, || m.cp.controller().ca().refusals_total() >= 1);
    assert!(refused.is_some(), "the refusal was not counted");
}

#[test]
fn scaling_a_service_out_adds_its_new_endpoint_within_two_seconds() {
    let mut m = mesh();
    let mut ev = m.n0.events();
    within(WAIT, || request(&m.client, vip(), "x").is_ok()).expect("reachable");
    // A second replica (its own service account, to tell the endpoints apart) on node 1.
    let extra = m._c.add_pod(1, "server2").unwrap();
    m.n1.enroll_as(&extra, "default", "server2").unwrap();
    let _app2 = PeerServer::start(&extra, 8080).unwrap();
    let node1 = m._c.node(1).name().to_string();
    let yaml = pod_yaml(&m.server, &node1, "server") + &pod_yaml(&extra, &node1, "server2");
    let client_yaml = pod_yaml(&m.client, m._c.node(0).name(), "client");
    // pod_yaml labels each pod app=<its name>: the new one joins the service by label.
    write(&m.cp.dir, "pods.yaml", &(client_yaml + &yaml.replace("app: server2", "app: server")));
    let second = "spiffe://cluster.local/ns/default/sa/server2";
    let took = within(Duration::from_secs(2), || {
        request(&m.client, vip(), "x").is_ok()
            && wait_record(&mut ev, WAIT, |r| r.direction == Direction::Outbound && r.dst == vip())
                .is_some_and(|r| r.dst_identity.as_deref() == Some(second))
    });
    assert!(took.is_some(), "the new endpoint got no traffic within 2 s of the edit");
}

#[test]
fn a_pod_the_control_plane_does_not_describe_gets_no_traffic_until_it_does() {
    let mut m = mesh();
    // Enrolled on node 1, but absent from the directory: with no workload record, none of
    // the policies that would select it are known, so it must not serve (nor dial) at all.
    let unknown = m._c.add_pod(1, "unknown").unwrap();
    m.n1.enroll_as(&unknown, "default", "server").unwrap();
    let _app = PeerServer::start(&unknown, 8080).unwrap();
    let dst = SocketAddr::new(unknown.ip4().into(), 8080);
    within(WAIT, || request(&m.client, vip(), "x").is_ok()).expect("the mesh is synced");
    assert!(request(&m.client, dst, "x").is_err(), "inbound to an undescribed pod was allowed");
    assert!(request(&unknown, vip(), "x").is_err(), "outbound from an undescribed pod was allowed");
    // Once described, the same pod serves: the refusal was about the missing record.
    let pods = pod_yaml(&m.client, m._c.node(0).name(), "client")
        + &pod_yaml(&m.server, m._c.node(1).name(), "server")
        + &pod_yaml(&unknown, m._c.node(1).name(), "server");
    write(&m.cp.dir, "pods.yaml", &pods);
    within(WAIT, || request(&m.client, dst, "x").is_ok()).expect("described pod reachable");
}

#[test]
fn check_lists_a_route_to_a_missing_backend_as_resolved_refs_false_backend_not_found() {
    let dir = std::env::temp_dir().join(format!("controller-check-routes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write(
        &dir,
        "routes.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\nspec:\n  clusterIP: 10.96.0.30\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: to-nowhere, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 9080}]\n  rules:\n  - backendRefs: [{name: nope, port: 9080}]\n",
    );
    let out = std::process::Command::new(mesh_tests::agent_process::ztunnel_binary())
        .args(["controller", "--check", "--config-dir"])
        .arg(dir.join("config"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "a route with an unresolved backend is a warning, not a rejection:\n{text}");
    assert!(
        text.lines().any(|l| l.ends_with(
            "HTTPRoute default/to-nowhere: parent Service default/reviews:9080: Accepted=True (Accepted), \
             ResolvedRefs=False (BackendNotFound: backendRef default/nope: Service not found)"
        )),
        "{text}"
    );
}
