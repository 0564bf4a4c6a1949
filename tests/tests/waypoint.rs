//! The waypoint end to end in the mini-cluster: a client pod on node 0 calls the `reviews`
//! service, whose traffic its node agent sends to the waypoint (`ztunnel waypoint` in its
//! own pod) in HBONE; the waypoint routes each request by the VirtualService and sends it to
//! `reviews` v1 (node 0) or v2/v3 (node 1) in HBONE as its own identity. Every test asserts
//! what the client received, what the apps received, or the waypoint's metrics.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mesh_tests::bookinfo::{get, get_many, App, Role};
use mesh_tests::mesh::{sweep_pins, write_mesh_config, MeshNode, RUN_DIR};
use mesh_tests::otlp::OtlpReceiver;
use mesh_tests::waypoint::{app_workload, service, vip, waypoint_workload, write_atomically, WaypointProcess};
use mesh_tests::{Cluster, InNetns, Pod};
use ztunnel::redirect::Exclusions;

const REVIEWS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const RATINGS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
const TCP_ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 32);
const GRPC_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 33);
/// A service that does not use the waypoint.
const DIRECT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 34);
/// One Service per version (`reviews-v1`..`reviews-v3`, `tcp-echo-v1`, `tcp-echo-v2`): the
/// Gateway API has no subsets, so its routes split between such Services, as Istio's docs do.
const VERSION_VIPS: [(&str, Ipv4Addr); 5] = [
    ("reviews-v1", Ipv4Addr::new(10, 96, 0, 35)),
    ("reviews-v2", Ipv4Addr::new(10, 96, 0, 36)),
    ("reviews-v3", Ipv4Addr::new(10, 96, 0, 37)),
    ("tcp-echo-v1", Ipv4Addr::new(10, 96, 0, 38)),
    ("tcp-echo-v2", Ipv4Addr::new(10, 96, 0, 39)),
];
const TCP_PORT: u16 = 9000;
const GRPC_PORT: u16 = 50051;
const PORT: u16 = 9080;
const WAIT: Duration = Duration::from_secs(10);

const SUBSETS: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
  - name: v3
    labels: {version: v3}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: tcp-echo
spec:
  host: tcp-echo
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
";

/// The scenario: cluster, agents, waypoint and apps, all torn down on drop.
struct Mesh {
    waypoint: WaypointProcess,
    apps: Vec<App>,
    client: Pod,
    waypoint_pod: Pod,
    _nodes: Vec<MeshNode>,
    c: Cluster,
}

/// How the `reviews` pods answer.
enum Backends {
    /// Each answers `reviews-vN`.
    Echo,
    /// Bookinfo's reviews v2 on node 1 (it calls `ratings`, also behind the waypoint).
    ReviewsCallingRatings,
    /// v1 is a pod with nothing listening (every connection to it fails).
    DeadV1,
    /// v1, v2 and v3 play these roles.
    Roles([Role; 3]),
}

fn mesh(routes: &str, backends: Backends) -> Mesh {
    mesh_with(routes, backends, |_| vec![])
}

/// [`mesh`], with more waypoint arguments, chosen once the waypoint's pod exists.
fn mesh_with(routes: &str, backends: Backends, waypoint_args: impl FnOnce(&Pod) -> Vec<String>) -> Mesh {
    build_mesh(routes, backends, waypoint_args, false, None)
}

/// [`mesh`] with the node agents' connection spans sent to the OTLP receiver at `endpoint`.
fn mesh_with_agent_spans(routes: &str, endpoint: &str) -> Mesh {
    build_mesh(routes, Backends::Echo, |_| vec![], false, Some(endpoint))
}

/// [`mesh`] with localities: each node is its own zone of `region-a` (`zone-0`, `zone-1`), and
/// the waypoint and reviews-v1 share node 0's.
fn mesh_in_zones(routes: &str, backends: Backends) -> Mesh {
    build_mesh(routes, backends, |_| vec![], true, None)
}

fn build_mesh(
    routes: &str,
    backends: Backends,
    waypoint_args: impl FnOnce(&Pod) -> Vec<String>,
    zoned: bool,
    agent_spans: Option<&str>,
) -> Mesh {
    let zone = |node: usize| {
        if zoned {
            format!("  locality: {{region: region-a, zone: zone-{node}}}\n")
        } else {
            String::new()
        }
    };
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let wp = c.add_pod(0, "waypoint").unwrap();
    let r1 = c.add_pod(0, "reviews-v1").unwrap();
    let r2 = c.add_pod(1, "reviews-v2").unwrap();
    let r3 = c.add_pod(1, "reviews-v3").unwrap();
    let ratings = c.add_pod(1, "ratings").unwrap();
    let echo1 = c.add_pod(0, "tcp-echo-v1").unwrap();
    let echo2 = c.add_pod(1, "tcp-echo-v2").unwrap();
    let grpc = c.add_pod(1, "grpc").unwrap();
    let node = |n| match agent_spans {
        Some(endpoint) => MeshNode::start_with_connection_spans(&c, n, endpoint).unwrap(),
        None => MeshNode::start(&c, n, Exclusions::default()).unwrap(),
    };
    let nodes = vec![node(0), node(1)];
    let mut yaml = String::from("workloads:\n");
    yaml += &mesh_tests::mesh::workload_yaml(&client, "default", "client", "");
    yaml += &waypoint_workload(&wp);
    yaml += &zone(0);
    for (pod, v, node) in [(&r1, "v1", 0), (&r2, "v2", 1), (&r3, "v3", 1)] {
        yaml += &versioned_workload(pod, "reviews", PORT, v);
        yaml += &zone(node);
    }
    yaml += &app_workload(&ratings, "ratings", PORT, "ratings", "v1");
    yaml += &versioned_workload(&echo1, "tcp-echo", TCP_PORT, "v1");
    yaml += &versioned_workload(&echo2, "tcp-echo", TCP_PORT, "v2");
    yaml += &app_workload(&grpc, "grpc", GRPC_PORT, "grpc", "v1");
    yaml += "services:\n";
    yaml += &service("reviews", REVIEWS_VIP, PORT, Some(&wp));
    yaml += &service("ratings", RATINGS_VIP, PORT, Some(&wp));
    yaml += &service("tcp-echo", TCP_ECHO_VIP, TCP_PORT, Some(&wp));
    yaml += &service("grpc", GRPC_VIP, GRPC_PORT, Some(&wp));
    yaml += &service("direct", DIRECT_VIP, PORT, None);
    for (name, ip) in VERSION_VIPS {
        yaml += &service(name, ip, if name.starts_with("tcp-echo") { TCP_PORT } else { PORT }, None);
    }
    write_mesh_config(&c, &yaml, &[&nodes[0], &nodes[1]]).unwrap();
    nodes[0].enroll_as(&client, "default", "client").unwrap();
    // Each app pod's identity is its app's service account, as `app_workload` declares it.
    for (pod, n, sa) in [
        (&r1, 0, "reviews"),
        (&r2, 1, "reviews"),
        (&r3, 1, "reviews"),
        (&ratings, 1, "ratings"),
        (&echo1, 0, "tcp-echo"),
        (&echo2, 1, "tcp-echo"),
        (&grpc, 1, "grpc"),
    ] {
        nodes[n].enroll_as(pod, "default", sa).unwrap();
    }
    let mut apps = Vec::new();
    let backends = match backends {
        Backends::Roles([a, b, c]) => {
            for (pod, role) in [(&r1, a), (&r2, b), (&r3, c)] {
                apps.push(App::start(pod, PORT, role).unwrap());
            }
            Backends::Roles([Role::Ratings, Role::Ratings, Role::Ratings])
        }
        other => {
            if !matches!(other, Backends::DeadV1) {
                apps.push(App::start(&r1, PORT, Role::Echo { name: "reviews-v1".into() }).unwrap());
            }
            other
        }
    };
    match backends {
        Backends::Roles(_) => {}
        Backends::ReviewsCallingRatings => {
            apps.push(App::start(&r2, PORT, Role::Reviews { version: 2, ratings: vip(RATINGS_VIP, PORT) }).unwrap())
        }
        _ => apps.push(App::start(&r2, PORT, Role::Echo { name: "reviews-v2".into() }).unwrap()),
    }
    if !matches!(backends, Backends::Roles(_)) {
        apps.push(App::start(&r3, PORT, Role::Echo { name: "reviews-v3".into() }).unwrap());
    }
    apps.push(App::start(&ratings, PORT, Role::Ratings).unwrap());
    apps.push(App::start(&echo1, TCP_PORT, Role::TcpEcho { prefix: "one".into() }).unwrap());
    apps.push(App::start(&echo2, TCP_PORT, Role::TcpEcho { prefix: "two".into() }).unwrap());
    apps.push(App::start(&grpc, GRPC_PORT, Role::Grpc { name: "grpc-v1".into() }).unwrap());
    let dir = PathBuf::from(RUN_DIR).join(format!("{}-routes", c.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    write_atomically(&dir.join("subsets.yaml"), SUBSETS).unwrap();
    write_atomically(&dir.join("routes.yaml"), routes).unwrap();
    let waypoint = WaypointProcess::start_with(&c, &wp, &dir, &waypoint_args(&wp)).expect("waypoint");
    Mesh { waypoint, apps, client, waypoint_pod: wp, _nodes: nodes, c }
}

fn reviews() -> SocketAddr {
    vip(REVIEWS_VIP, PORT)
}

/// An app pod's workload entry in its app's Service and in its version's own Service
/// (`reviews-v1`), with the `app`/`version` labels DestinationRule subsets select.
fn versioned_workload(pod: &Pod, app: &str, port: u16, version: &str) -> String {
    mesh_tests::mesh::workload_yaml(
        pod,
        "default",
        app,
        &format!(
            "  services:\n    default/{app}.default.svc.cluster.local:\n      {port}: {port}\n    default/{app}-{version}.default.svc.cluster.local:\n      {port}: {port}\n  canonicalName: {app}\n  canonicalRevision: {version}\n  labels:\n    app: {app}\n    version: {version}\n"
        ),
    )
}

fn vs(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n{http}"
    )
}

const ALL_V1: &str = "  - route:\n    - destination: {host: reviews, subset: v1}\n";

fn version_counts(answers: &[(u16, String)]) -> [usize; 4] {
    let mut n = [0; 4];
    for (status, body) in answers {
        assert_eq!(*status, 200, "{body}");
        match body.trim() {
            "reviews-v1" => n[1] += 1,
            "reviews-v2" => n[2] += 1,
            "reviews-v3" => n[3] += 1,
            _ => n[0] += 1,
        }
    }
    n
}

/// 1000 requests split 75/25 between v1 and v3, within 5 sigma. Binomial(1000, 0.25): mean
/// 250, sigma 13.7; the bound is ±69, so a correct split fails it about once in 1.7 million runs.
fn assert_75_25_split_of_v1_and_v3(m: &Mesh) {
    let answers = get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], 1000, WAIT).unwrap();
    let n = version_counts(&answers);
    assert_eq!(n[0] + n[2], 0, "only v1 and v3 take traffic: {n:?}");
    assert!((181..=319).contains(&n[3]), "v3 got {} of 1000 (expected 250 ± 69)", n[3]);
    assert_eq!(n[1] + n[3], 1000);
}

/// `end-user: jason` lands on v2 every time, and `jasonx` on v1 (exact means exact).
fn assert_jason_on_v2_and_jasonx_on_v1(m: &Mesh) {
    let jason =
        get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[("end-user", "jason")], 100, WAIT).unwrap();
    assert_eq!(version_counts(&jason), [0, 0, 100, 0]);
    let other =
        get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[("end-user", "jasonx")], 100, WAIT).unwrap();
    assert_eq!(version_counts(&other), [0, 100, 0, 0], "exact means exact: jasonx is not jason");
}

#[test]
fn weighted_split_lands_within_five_sigma_over_1000_requests() {
    let m = mesh(
        &vs("  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 75\n    - destination: {host: reviews, subset: v3}\n      weight: 25\n"),
        Backends::Echo,
    );
    assert_75_25_split_of_v1_and_v3(&m);
}

#[test]
fn header_match_sends_jason_to_v2_and_everyone_else_to_v1() {
    let m = mesh(
        &vs("  - match:\n    - headers:\n        end-user: {exact: jason}\n    route:\n    - destination: {host: reviews, subset: v2}\n  - route:\n    - destination: {host: reviews, subset: v1}\n"),
        Backends::Echo,
    );
    assert_jason_on_v2_and_jasonx_on_v1(&m);
    let nobody = get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], 100, WAIT).unwrap();
    assert_eq!(version_counts(&nobody), [0, 100, 0, 0]);
}

#[test]
fn injected_delay_holds_the_request_for_its_fixed_delay() {
    let m = mesh(
        &vs("  - fault:\n      delay:\n        fixedDelay: 1s\n        percentage: {value: 100}\n    route:\n    - destination: {host: reviews, subset: v1}\n"),
        Backends::Echo,
    );
    let t = Instant::now();
    let (status, body, _) = get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], WAIT).unwrap();
    let took = t.elapsed();
    assert_eq!((status, body.trim()), (200, "reviews-v1"));
    assert!(took >= Duration::from_secs(1), "answered after {took:?}, before the 1 s delay");
    assert!(took < Duration::from_millis(1500), "answered after {took:?}");
    assert_eq!(m.waypoint.wait_metric("istio_requests_total", &[("response_flags", "DI")], 1.0).unwrap(), 1.0);
}

#[test]
fn injected_abort_answers_its_status_without_reaching_the_app() {
    let m = mesh(
        &vs("  - match:\n    - headers:\n        end-user: {exact: jason}\n    fault:\n      abort:\n        httpStatus: 500\n        percentage: {value: 100}\n    route:\n    - destination: {host: reviews, subset: v1}\n  - route:\n    - destination: {host: reviews, subset: v1}\n"),
        Backends::Echo,
    );
    let (status, _, _) =
        get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[("end-user", "jason")], WAIT).unwrap();
    assert_eq!(status, 500);
    assert!(m.apps[0].received().is_empty(), "the aborted request reached v1");
    let (status, body, _) = get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], WAIT).unwrap();
    assert_eq!((status, body.trim()), (200, "reviews-v1"));
    assert_eq!(
        m.waypoint
            .wait_metric("istio_requests_total", &[("response_flags", "FI"), ("response_code", "500")], 1.0)
            .unwrap(),
        1.0
    );
}

#[test]
fn route_timeout_fires_at_half_a_second_while_ratings_is_delayed() {
    // Istio's request-timeouts task: ratings is delayed 2 s, reviews (v2, which calls
    // ratings through the waypoint too) has a 0.5 s timeout.
    let routes = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: ratings\nspec:\n  hosts: [ratings]\n  http:\n  - fault:\n      delay:\n        fixedDelay: 2s\n        percentage: {{value: 100}}\n    route:\n    - destination: {{host: ratings}}\n",
        vs("  - route:\n    - destination: {host: reviews, subset: v2}\n    timeout: 0.5s\n")
    );
    let m = mesh(&routes, Backends::ReviewsCallingRatings);
    let t = Instant::now();
    let (status, body, _) = get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], WAIT).unwrap();
    let took = t.elapsed();
    assert_eq!(status, 504, "{body}");
    assert_eq!(body, "upstream request timeout");
    // Margin: 400 ms over the 0.5 s for two HBONE hops, the client's own connect and a busy CI
    // machine (the timeout is the waypoint's; a 2 s delay that slipped through would show).
    assert!(took >= Duration::from_millis(500) && took < Duration::from_millis(900), "timed out after {took:?}");
    assert_eq!(
        m.waypoint
            .wait_metric("istio_requests_total", &[("response_flags", "UT"), ("response_code", "504")], 1.0)
            .unwrap(),
        1.0
    );
}

#[test]
fn retries_of_a_dead_endpoint_are_counted_and_flagged_urx() {
    let m = mesh(
        &vs("  - route:\n    - destination: {host: reviews, subset: v1}\n    retries:\n      attempts: 3\n      retryOn: connect-failure\n"),
        Backends::DeadV1,
    );
    let (status, _, _) = get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], WAIT).unwrap();
    assert_eq!(status, 503);
    let svc = "reviews.default.svc.cluster.local";
    assert_eq!(
        m.waypoint.wait_metric("ztunnel_waypoint_retries_total", &[("destination_service", svc)], 3.0).unwrap(),
        3.0
    );
    assert_eq!(
        m.waypoint
            .wait_metric("istio_requests_total", &[("response_flags", "URX"), ("response_code", "503")], 1.0)
            .unwrap(),
        1.0
    );
}

#[test]
fn mirror_gets_a_shadow_copy_while_the_client_sees_the_primary_only() {
    let m = mesh(
        &vs("  - route:\n    - destination: {host: reviews, subset: v1}\n    mirror: {host: reviews, subset: v2}\n    mirrorPercentage: {value: 100}\n"),
        Backends::Echo,
    );
    let answers = get_many(&m.client, reviews(), "/reviews/7", "reviews:9080", &[], 20, WAIT).unwrap();
    assert_eq!(version_counts(&answers), [0, 20, 0, 0], "answers come from the primary only");
    let deadline = Instant::now() + WAIT;
    let v2 = &m.apps[1];
    while v2.received().len() < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let copies = v2.received();
    assert_eq!(copies.len(), 20, "every request mirrored once");
    assert!(copies.iter().all(|r| r.host == "reviews-shadow:9080" && r.path == "/reviews/7"), "{copies:?}");
    assert!(m.apps[2].received().is_empty(), "v3 untouched");
}

#[test]
fn l7_authorization_policy_allows_get_and_denies_other_methods_and_paths_with_403() {
    let policy = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: reviews-viewer\nspec:\n  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: reviews\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/client\"]\n    to:\n    - operation:\n        methods: [GET]\n        paths: [\"/reviews/*\"]\n";
    let m = mesh(&format!("{}{policy}", vs(ALL_V1)), Backends::Echo);
    let (status, body, _) = get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], WAIT).unwrap();
    assert_eq!((status, body.trim()), (200, "reviews-v1"));
    let (status, body, _) = get(&m.client, reviews(), "/admin", "reviews:9080", &[], WAIT).unwrap();
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    let post =
        raw(&m.client, reviews(), b"POST /reviews/0 HTTP/1.1\r\nHost: reviews:9080\r\nContent-Length: 0\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 403"), "{post}");
    assert_eq!(m.apps[0].received().len(), 1, "only the allowed request reached the app");
}

#[test]
fn invalid_virtual_service_is_rejected_and_the_previous_version_keeps_serving() {
    let m = mesh(&vs(ALL_V1), Backends::Echo);
    let before = m.waypoint.metric_sum("ztunnel_config_rejected_total", &[]).unwrap();
    m.waypoint
        .write_routes("routes.yaml", &vs("  - route:\n    - destination: {host: reviews, subset: v2}\n      weight: -5\n    - destination: {host: reviews, subset: v3}\n      weight: 105\n"))
        .unwrap();
    let answers = get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], 20, WAIT).unwrap();
    assert_eq!(version_counts(&answers), [0, 20, 0, 0], "the last valid version (all to v1) still serves");
    assert!(m.waypoint.metric_sum("ztunnel_config_rejected_total", &[]).unwrap() > before, "rejection counted");
}

/// Sends `bytes` on a fresh connection from `pod` and reads the answer until the server closes.
fn raw(pod: &Pod, dst: SocketAddr, bytes: &'static [u8]) -> String {
    pod.run(move || {
        let mut s = TcpStream::connect_timeout(&dst, WAIT).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// A keep-alive connection opened before a bad request, still answering after it.
fn bad_input_is_refused_and_other_tunnels_are_unaffected(bad: &'static [u8], expected_status: &str) {
    let m = mesh(&vs(ALL_V1), Backends::Echo);
    let client = m.client.clone();
    let dst = reviews();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Vec<String>>();
    // The good connection lives on its own thread in the client pod.
    std::thread::spawn(move || {
        let out = client.run(move || {
            let mut s = TcpStream::connect_timeout(&dst, WAIT).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            let mut answers = Vec::new();
            for _ in 0..2 {
                s.write_all(b"GET /reviews/0 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n").unwrap();
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                answers.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                if answers.len() == 1 {
                    let _ = rx.recv();
                }
            }
            answers
        });
        let _ = done_tx.send(out);
    });
    std::thread::sleep(Duration::from_millis(300));
    let answer = raw(&m.client, dst, bad);
    assert!(answer.starts_with(&format!("HTTP/1.1 {expected_status}")), "bad input answered {answer:?}");
    let _ = tx.send(());
    let good = done_rx.recv_timeout(WAIT).expect("good connection finished");
    assert!(good.iter().all(|a| a.starts_with("HTTP/1.1 200") && a.contains("reviews-v1")), "{good:?}");
}

#[test]
fn a_bad_request_line_gets_400_and_the_connection_closed() {
    bad_input_is_refused_and_other_tunnels_are_unaffected(b"GARBAGE\r\n\r\n", "400");
}

#[test]
fn a_bad_header_gets_400_and_the_connection_closed() {
    bad_input_is_refused_and_other_tunnels_are_unaffected(b"GET / HTTP/1.1\r\nHost: r\r\nBad Header: x\r\n\r\n", "400");
}

#[test]
fn content_length_with_transfer_encoding_gets_400() {
    bad_input_is_refused_and_other_tunnels_are_unaffected(
        b"POST /reviews/0 HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "400",
    );
}

#[test]
fn duplicate_content_length_gets_400() {
    bad_input_is_refused_and_other_tunnels_are_unaffected(
        b"POST /reviews/0 HTTP/1.1\r\nHost: r\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        "400",
    );
}

#[test]
fn a_host_that_is_not_an_authority_gets_400() {
    // Read as one URI for a gRPC upstream, this Host would have turned the path the policy
    // checked (/pkg.Svc/Public) into another (/pkg.Svc/Admin).
    bad_input_is_refused_and_other_tunnels_are_unaffected(
        b"POST /pkg.Svc/Public HTTP/1.1\r\nHost: reviews/pkg.Svc/Admin#\r\ncontent-type: application/grpc\r\nContent-Length: 0\r\n\r\n",
        "400",
    );
}

#[test]
fn oversized_headers_get_431_and_the_connection_closed() {
    static BIG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let big = BIG.get_or_init(|| {
        let mut b = b"GET /reviews/0 HTTP/1.1\r\nHost: r\r\nX-Big: ".to_vec();
        b.extend(std::iter::repeat_n(b'a', 64 * 1024));
        b.extend(b"\r\n\r\n");
        b
    });
    bad_input_is_refused_and_other_tunnels_are_unaffected(big, "431");
}

#[test]
fn tcp_routes_shift_80_20_within_five_sigma_over_500_connections() {
    let routes = "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata:\n  name: tcp-echo\nspec:\n  hosts: [tcp-echo]\n  tcp:\n  - match:\n    - port: 9000\n    route:\n    - destination: {host: tcp-echo, port: {number: 9000}, subset: v1}\n      weight: 80\n    - destination: {host: tcp-echo, port: {number: 9000}, subset: v2}\n      weight: 20\n";
    let m = mesh(routes, Backends::Echo);
    let dst = vip(TCP_ECHO_VIP, TCP_PORT);
    let answers: Vec<String> = m.client.run(move || {
        (0..500)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&dst, WAIT).unwrap();
                s.set_read_timeout(Some(WAIT)).unwrap();
                s.write_all(b"hello\n").unwrap();
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).unwrap();
                String::from_utf8_lossy(&buf[..n]).into_owned()
            })
            .collect()
    });
    let two = answers.iter().filter(|a| a.as_str() == "two hello\n").count();
    let one = answers.iter().filter(|a| a.as_str() == "one hello\n").count();
    assert_eq!(one + two, 500, "every connection answered by tcp-echo: {:?}", &answers[..3]);
    // Binomial(500, 0.2): mean 100, sigma 8.9; 5 sigma is ±45.
    assert!((55..=145).contains(&two), "v2 took {two} of 500 (expected 100 ± 45)");
}

#[test]
fn http2_clients_are_routed_like_http1_clients() {
    let m = mesh(&vs(ALL_V1), Backends::Echo);
    for _ in 0..5 {
        let (status, body) = mesh_tests::grpc_app::h2_get(&m.client, reviews(), "reviews:9080", "/reviews/0").unwrap();
        assert_eq!((status, body.trim()), (200, "reviews-v1"));
    }
    assert_eq!(m.apps[0].received().len(), 5);
}

#[test]
fn grpc_calls_cross_the_waypoint_with_their_trailers() {
    let m = mesh(&vs(ALL_V1), Backends::Echo);
    let reply =
        mesh_tests::grpc_app::call(&m.client, vip(GRPC_VIP, GRPC_PORT), "grpc:50051", "/demo.Echo/Say", b"hi").unwrap();
    assert_eq!(
        (reply.http_status, reply.grpc_status.as_deref(), reply.message.as_slice()),
        (200, Some("0"), &b"grpc-v1"[..])
    );
    let seen = m.apps[6].received();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/demo.Echo/Say");
    assert_eq!(
        m.waypoint
            .wait_metric("istio_requests_total", &[("request_protocol", "grpc"), ("grpc_response_status", "0")], 1.0)
            .unwrap(),
        1.0
    );
}

#[test]
fn grpc_abort_fault_answers_the_grpc_status() {
    let routes = "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata:\n  name: grpc\nspec:\n  hosts: [grpc]\n  http:\n  - fault:\n      abort:\n        grpcStatus: UNAVAILABLE\n        percentage: {value: 100}\n    route:\n    - destination: {host: grpc}\n";
    let m = mesh(routes, Backends::Echo);
    let reply =
        mesh_tests::grpc_app::call(&m.client, vip(GRPC_VIP, GRPC_PORT), "grpc:50051", "/demo.Echo/Say", b"hi").unwrap();
    assert_eq!((reply.http_status, reply.grpc_status.as_deref()), (200, Some("14")));
    assert!(m.apps[6].received().is_empty(), "the aborted call reached the server");
}

#[test]
fn header_rules_and_trace_context_reach_the_app_and_the_client() {
    let m = mesh(
        &vs("  - headers:\n      request:\n        set: {x-routed: waypoint}\n        add: {x-added: one}\n        remove: [x-drop]\n      response:\n        set: {x-served-by: reviews}\n    route:\n    - destination: {host: reviews, subset: v1}\n"),
        Backends::Echo,
    );
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    let (status, _, headers) = get(
        &m.client,
        reviews(),
        "/reviews/0",
        "reviews:9080",
        &[("x-drop", "secret"), ("traceparent", &parent)],
        WAIT,
    )
    .unwrap();
    assert_eq!(status, 200);
    assert!(headers.iter().any(|(k, v)| k == "x-served-by" && v == "reviews"), "{headers:?}");
    let seen = &m.apps[0].received()[0];
    assert_eq!(seen.header("x-routed"), Some("waypoint"));
    assert_eq!(seen.header("x-added"), Some("one"));
    assert_eq!(seen.header("x-drop"), None);
    let tp = seen.header("traceparent").expect("traceparent reached the app");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts[1], trace, "same trace");
    assert_ne!(parts[2], "00f067aa0ba902b7", "the waypoint added its own span id");
}

#[test]
fn three_hop_trace_client_waypoint_server_arrives_at_the_otlp_receiver_with_its_parentage() {
    // The receiver listens in the waypoint's own pod (not captured), as a collector would.
    let receiver = std::cell::RefCell::new(None);
    let m = mesh_with(&vs(ALL_V1), Backends::Echo, |wp| {
        let r = OtlpReceiver::start(wp, 4318).expect("OTLP receiver");
        let args = r.proxy_args();
        *receiver.borrow_mut() = Some(r);
        args
    });
    let receiver = receiver.into_inner().unwrap();
    // Hop 1, the client: its own span id in a sampled traceparent.
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "10f067aa0ba902b7";
    let parent = format!("00-{trace}-{client_span}-01");
    let (status, _, _) =
        get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[("traceparent", &parent)], WAIT).unwrap();
    assert_eq!(status, 200);
    // Hop 2, the waypoint: a server span in the client's trace, child of the client's span.
    let w = receiver.wait_for("from the waypoint", |s| s.trace_id == trace, Duration::from_secs(10)).unwrap();
    assert_eq!(w.parent_span_id, client_span, "{w:#?}");
    assert_eq!(w.service, "waypoint.default");
    assert_eq!(w.kind, 2, "SPAN_KIND_SERVER: {w:#?}");
    assert_eq!(w.attr("http.response.status_code"), Some("200"), "{w:#?}");
    assert_eq!(w.attr("http.request.method"), Some("GET"));
    assert!(w.attr("upstream.cluster").is_some_and(|c| c.starts_with("reviews.")), "{w:#?}");
    // Hop 3, the server: the traceparent it received names the waypoint's span as its parent.
    let seen = &m.apps[0].received()[0];
    let tp = seen.header("traceparent").expect("traceparent reached the app");
    assert_eq!(tp, format!("00-{trace}-{}-01", w.span_id));
}

#[test]
fn unsampled_requests_export_no_spans_but_still_carry_a_new_parent() {
    let receiver = std::cell::RefCell::new(None);
    let m = mesh_with(&vs(ALL_V1), Backends::Echo, |wp| {
        let r = OtlpReceiver::start(wp, 4318).expect("OTLP receiver");
        let args = r.proxy_args();
        *receiver.borrow_mut() = Some(r);
        args
    });
    let receiver = receiver.into_inner().unwrap();
    let trace = "6bf92f3577b34da6a3ce929d0e0e4736";
    let unsampled = format!("00-{trace}-20f067aa0ba902b7-00");
    let sampled = "00-7bf92f3577b34da6a3ce929d0e0e4736-30f067aa0ba902b7-01";
    for tp in [unsampled.as_str(), sampled] {
        let (status, _, _) =
            get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[("traceparent", tp)], WAIT).unwrap();
        assert_eq!(status, 200);
    }
    // The sampled one arrives; by then the unsampled one (sent first) would have too.
    receiver.wait_for("of the sampled request", |s| s.trace_id.starts_with("7bf9"), Duration::from_secs(10)).unwrap();
    assert!(receiver.spans().iter().all(|s| s.trace_id != trace), "{:#?}", receiver.spans());
    let tp = m.apps[0].received()[0].header("traceparent").unwrap().to_string();
    assert!(tp.starts_with(&format!("00-{trace}-")) && tp.ends_with("-00") && !tp.contains("20f067aa0ba902b7"), "{tp}");
}

#[test]
fn a_pooled_upstream_tunnel_carries_no_single_requests_trace() {
    // The waypoint's upstream connection to ratings carries two requests (then closes, so
    // the destination agent's span for it ends and is exported). It belongs to neither
    // request, so its CONNECT must not name either one's trace: the destination's span
    // for the tunnel would otherwise sit inside the first request's trace for as long as
    // the connection lives, however many other requests it carries.
    let receiver = OtlpReceiver::start_local().unwrap();
    let two_per_connection = "\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ratings}\nspec:\n  host: ratings\n  trafficPolicy:\n    connectionPool:\n      http: {maxRequestsPerConnection: 2}\n";
    let m = mesh_with_agent_spans(&format!("{}{two_per_connection}", vs(ALL_V1)), &receiver.endpoint());
    let traces = ["8bf92f3577b34da6a3ce929d0e0e4736", "9bf92f3577b34da6a3ce929d0e0e4736"];
    for trace in traces {
        let tp = format!("00-{trace}-40f067aa0ba902b7-01");
        let (status, _, _) =
            get(&m.client, vip(RATINGS_VIP, PORT), "/ratings/0", "ratings:9080", &[("traceparent", &tp)], WAIT)
                .unwrap();
        assert_eq!(status, 200);
    }
    let from_waypoint = |s: &mesh_tests::otlp::ReceivedSpan| {
        s.name.starts_with("inbound ")
            && s.attr("istio.source_principal") == Some("spiffe://cluster.local/ns/default/sa/waypoint")
    };
    let tunnel =
        receiver.wait_for("the ratings tunnel's inbound span", from_waypoint, Duration::from_secs(10)).unwrap();
    assert!(!traces.contains(&tunnel.trace_id.as_str()), "{tunnel:#?}");
    assert!(tunnel.parent_span_id.is_empty(), "the tunnel starts its own trace: {tunnel:#?}");
}

/// The waypoint's access-log lines so far, waiting until one contains `needle`.
fn access_line(m: &Mesh, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = m.waypoint.log();
        if let Some(l) = log.lines().find(|l| l.contains(needle)) {
            return l.to_string();
        }
        assert!(Instant::now() < deadline, "no access-log line with {needle:?} in:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn default_access_log_line_is_istios_text_format() {
    let m = mesh(&vs(ALL_V1), Backends::Echo);
    let (status, _, _) =
        get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[("user-agent", "trace-test/1")], WAIT).unwrap();
    assert_eq!(status, 200);
    let line = access_line(&m, "trace-test/1");
    // [START_TIME] "METHOD PATH PROTOCOL" CODE FLAGS DETAILS ... "USER-AGENT" ... "AUTHORITY" "UPSTREAM_HOST" CLUSTER
    let at = line.find("[20").expect("start time");
    let rest = &line[at..];
    assert!(rest.contains("] \"GET /reviews/0 HTTP/1.1\" 200 - via_upstream - \"-\" 0 "), "{rest}");
    assert!(rest.contains("\"trace-test/1\""), "{rest}");
    assert!(rest.contains("\"reviews:9080\""), "{rest}");
    assert!(rest.contains(" reviews.default.svc.cluster.local "), "{rest}");
    assert!(rest.contains(&format!(" {} ", reviews())), "downstream local address: {rest}");
}

#[test]
fn sigterm_ends_the_waypoint_cleanly_with_every_access_log_line_written() {
    let mut m = mesh(&vs(ALL_V1), Backends::Echo);
    // Lines are written in batches; the last ones must not be lost when the pod is stopped.
    for i in 0..5 {
        let ua = format!("last-words/{i}");
        let (status, _, _) =
            get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[("user-agent", ua.as_str())], WAIT).unwrap();
        assert_eq!(status, 200);
    }
    let status = m.waypoint.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}");
    let log = m.waypoint.log();
    for i in 0..5 {
        let ua = format!("\"last-words/{i}\"");
        assert_eq!(log.lines().filter(|l| l.contains(&ua)).count(), 1, "{ua} once in:\n{log}");
    }
}

#[test]
fn access_log_format_is_configurable_with_envoy_operators() {
    let format = "AL %REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_CODE_DETAILS% %RESPONSE_FLAGS% %REQ(X-MISSING?USER-AGENT)% %RESP(X-SERVED-BY)%";
    let m = mesh_with(
        &vs("  - match:\n    - uri: {prefix: /boom}\n    fault:\n      abort: {httpStatus: 503, percentage: {value: 100}}\n    route:\n    - destination: {host: reviews, subset: v1}\n  - headers:\n      response:\n        set: {x-served-by: reviews}\n    route:\n    - destination: {host: reviews, subset: v1}\n"),
        Backends::Echo,
        |_| vec!["--access-log-format".into(), format.into()],
    );
    for path in ["/reviews/0", "/boom"] {
        get(&m.client, reviews(), path, "reviews:9080", &[("user-agent", "fmt-test")], WAIT).unwrap();
    }
    assert_eq!(
        access_line(&m, "AL GET /reviews/0").split_once("AL ").unwrap().1,
        "GET /reviews/0 200 via_upstream - fmt-test reviews"
    );
    assert_eq!(
        access_line(&m, "AL GET /boom").split_once("AL ").unwrap().1,
        "GET /boom 503 fault_filter_abort FI fmt-test -"
    );
}

#[test]
fn an_unknown_access_log_operator_stops_the_waypoint_with_its_name() {
    let dir = std::env::temp_dir().join(format!("wp-format-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, "workloads: []\nservices: []\n").unwrap();
    let out = std::process::Command::new(mesh_tests::agent_process::ztunnel_binary())
        .args(["waypoint", "--listen", "127.0.0.1:0", "--access-log-format", "%BOGUS%", "--local-config"])
        .arg(&config)
        .arg("--ca-state-dir")
        .arg(dir.join("ca"))
        .args(["--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown access-log operator %BOGUS%"), "{err}");
}

#[test]
fn an_http2_protocol_violation_gets_goaway_and_other_tunnels_are_unaffected() {
    let m = mesh(&vs(ALL_V1), Backends::Echo);
    let good = get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], 1, WAIT).unwrap();
    assert_eq!(version_counts(&good), [0, 1, 0, 0]);
    // Preface, empty SETTINGS, then HEADERS on stream 2: clients must use odd stream ids.
    let mut bad = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bad.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
    bad.extend([0, 0, 3, 1, 5, 0, 0, 0, 2, 0x82, 0x84, 0x86]);
    let answer = raw_bytes(&m.client, reviews(), bad);
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 9 <= answer.len() {
        let len = u32::from_be_bytes([0, answer[at], answer[at + 1], answer[at + 2]]) as usize;
        frames.push((answer[at + 3], answer[at + 9..(at + 9 + len).min(answer.len())].to_vec()));
        at += 9 + len;
    }
    let goaway = frames.iter().find(|(t, _)| *t == 7).expect("a GOAWAY frame");
    assert_eq!(&goaway.1[4..8], &[0, 0, 0, 1], "error code PROTOCOL_ERROR");
    let after = get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], 3, WAIT).unwrap();
    assert_eq!(version_counts(&after), [0, 3, 0, 0], "other tunnels still served");
}

/// Like [`raw`], with owned bytes and the answer as bytes.
fn raw_bytes(pod: &Pod, dst: SocketAddr, bytes: Vec<u8>) -> Vec<u8> {
    pod.run(move || {
        let mut s = TcpStream::connect_timeout(&dst, WAIT).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(&bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    })
}

fn policy(name: &str, service: &str, action: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\nspec:\n  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: {service}\n  action: {action}\n  rules:\n{rules}"
    )
}

#[test]
fn tcp_routed_tunnels_are_held_to_the_policies_of_their_service() {
    let routes = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: tcp-echo\nspec:\n  hosts: [tcp-echo]\n  tcp:\n  - route:\n    - destination: {{host: tcp-echo, subset: v1}}\n{}",
        policy("only-admin", "tcp-echo", "ALLOW", "  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/admin\"]\n")
    );
    let m = mesh(&routes, Backends::Echo);
    let dst = vip(TCP_ECHO_VIP, TCP_PORT);
    let answer = m.client.run(move || {
        let mut s = TcpStream::connect_timeout(&dst, WAIT).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let _ = s.write_all(b"hello\n");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf
    });
    assert!(answer.is_empty(), "the client (not admin) got an echo: {:?}", String::from_utf8_lossy(&answer));
    assert!(m.apps[4].received().is_empty() && m.apps[5].received().is_empty(), "tcp-echo was reached");
}

#[test]
fn l7_policy_sees_the_normalized_path_the_app_would_read() {
    let routes = format!(
        "{}{}",
        vs(ALL_V1),
        policy("no-admin", "reviews", "DENY", "  - to:\n    - operation:\n        paths: [\"/admin*\"]\n")
    );
    let m = mesh(&routes, Backends::Echo);
    for path in ["/admin", "/public/../admin", "/public/%2e%2e/admin", "/%61dmin", "//admin", "/./admin/x"] {
        let (status, _, _) = get(&m.client, reviews(), path, "reviews:9080", &[], WAIT).unwrap();
        assert_eq!(status, 403, "{path}");
    }
    for path in ["/public/%2fadmin", "/public/%5c..%5cadmin"] {
        let (status, _, _) = get(&m.client, reviews(), path, "reviews:9080", &[], WAIT).unwrap();
        assert_eq!(status, 400, "{path}");
    }
    let (status, body, _) = get(&m.client, reviews(), "/public/../reviews/0", "reviews:9080", &[], WAIT).unwrap();
    assert_eq!((status, body.trim()), (200, "reviews-v1"));
    let seen = m.apps[0].received();
    assert_eq!(
        seen.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
        ["/reviews/0"],
        "the app got the normalized path only"
    );
}

#[test]
fn connect_to_an_undeclared_port_or_a_service_without_this_waypoint_is_refused() {
    let m = mesh(&vs(ALL_V1), Backends::Echo);
    let wp = std::net::IpAddr::from(m.waypoint_pod.ip4());
    let client = "spiffe://cluster.local/ns/default/sa/client";
    let waypoint = "spiffe://cluster.local/ns/default/sa/waypoint";
    let from = SocketAddr::new(m.client.ip4().into(), 40000);
    // From node 0's own namespace: a pod's connections to 15008 would be captured.
    let node = m.c.node(0);
    let ok = mesh_tests::mesh::hbone_connect(&m.c, node, client, waypoint, wp, reviews(), from);
    assert!(ok.is_ok(), "a declared port of a service using the waypoint: {ok:?}");
    for target in [vip(REVIEWS_VIP, 8081), vip(DIRECT_VIP, PORT), SocketAddr::new(m.apps_pod_ip(), PORT)] {
        let refused = mesh_tests::mesh::hbone_connect(&m.c, node, client, waypoint, wp, target, from);
        assert!(refused.as_ref().is_err_and(|e| e.contains("400")), "{target}: {refused:?}");
    }
}

#[test]
fn the_app_learns_the_caller_from_the_waypoint_not_from_client_headers() {
    let m = mesh(&vs(ALL_V1), Backends::Echo);
    let forged = "By=spiffe://cluster.local/ns/default/sa/reviews;URI=spiffe://cluster.local/ns/default/sa/admin";
    let (status, _, _) =
        get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[("x-forwarded-client-cert", forged)], WAIT).unwrap();
    assert_eq!(status, 200);
    let seen = &m.apps[0].received()[0];
    assert_eq!(
        seen.header("x-forwarded-client-cert"),
        Some("By=spiffe://cluster.local/ns/default/sa/waypoint;URI=spiffe://cluster.local/ns/default/sa/client")
    );
}

impl Mesh {
    /// The reviews-v1 pod's address (a workload, not a service).
    fn apps_pod_ip(&self) -> std::net::IpAddr {
        self.c.pods().iter().find(|p| p.name() == "reviews-v1").map(|p| p.ip4().into()).expect("reviews-v1 pod")
    }
}

fn answer(name: &str, status: u16, delay_ms: u64) -> Role {
    Role::Answer { name: name.into(), status, delay: Duration::from_millis(delay_ms) }
}

/// `n` requests to reviews from the client, `concurrency` at a time: their statuses.
fn concurrent(m: &Mesh, n: usize, concurrency: usize) -> Vec<u16> {
    let per = n / concurrency;
    let handles: Vec<_> = (0..concurrency)
        .map(|_| {
            let client = m.client.clone();
            std::thread::spawn(move || {
                (0..per)
                    .map(|_| get(&client, reviews(), "/reviews/0", "reviews:9080", &[], WAIT).map(|r| r.0).unwrap_or(0))
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
}

const BREAKER: &str = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-breaker}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
";

#[test]
fn circuit_breaker_answers_503_uo_over_its_limits_and_recovers_when_load_drops() {
    // One slow endpoint (100 ms), one connection and one pending request allowed: of 5
    // concurrent callers, some must overflow.
    let routes = format!("{}{BREAKER}", vs(ALL_V1));
    let m = mesh(
        &routes,
        Backends::Roles([answer("reviews-v1", 200, 100), answer("reviews-v2", 200, 0), answer("reviews-v3", 200, 0)]),
    );
    let mut table = Vec::new();
    for concurrency in [1, 2, 5, 10] {
        let statuses = concurrent(&m, concurrency * 6, concurrency);
        let overflowed = statuses.iter().filter(|s| **s == 503).count();
        assert!(statuses.iter().all(|s| *s == 200 || *s == 503), "{statuses:?}");
        table.push((concurrency, statuses.len(), overflowed));
    }
    eprintln!("circuit breaking (maxConnections 1, http1MaxPendingRequests 1, 100 ms upstream):");
    for (c, n, o) in &table {
        eprintln!(
            "  concurrency {c:>2}: {n:>3} requests, {o:>3} answered 503 UO ({:.0}%)",
            100.0 * *o as f64 / *n as f64
        );
    }
    assert_eq!(table[0].2, 0, "one caller at a time never overflows: {table:?}");
    assert!(table[3].2 > 0, "ten concurrent callers overflow: {table:?}");
    let uo = m
        .waypoint
        .wait_metric(
            "istio_requests_total",
            &[("response_flags", "UO"), ("response_code", "503")],
            table.iter().map(|t| t.2 as f64).sum(),
        )
        .unwrap();
    assert!(uo >= 1.0);
    // Load gone: every request passes again.
    let after = concurrent(&m, 5, 1);
    assert!(after.iter().all(|s| *s == 200), "{after:?}");
}

/// Sends `n` requests one after another to `reviews` (all routed to v1) and returns how
/// many connections reviews-v1 accepted meanwhile.
fn v1_connections_for(m: &Mesh, n: usize) -> u64 {
    let before = m.apps[0].connections();
    for _ in 0..n {
        let (status, body, _) = get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], WAIT).unwrap();
        assert_eq!((status, body.trim()), (200, "reviews-v1"));
    }
    m.apps[0].connections() - before
}

#[test]
fn upstream_connections_are_reused_across_requests() {
    let m = mesh(&vs(ALL_V1), Backends::Echo);
    let opened = v1_connections_for(&m, 6);
    assert!(opened <= 2, "6 sequential requests opened {opened} connections to the endpoint");
}

#[test]
fn max_requests_per_connection_1_gives_each_request_its_own_upstream_connection() {
    let limit = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-per-connection}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      http: {maxRequestsPerConnection: 1}
";
    let m = mesh(&format!("{}{limit}", vs(ALL_V1)), Backends::Echo);
    assert_eq!(v1_connections_for(&m, 6), 6);
}

const OUTLIERS: &str = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-outliers}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3s
      maxEjectionPercent: 100
";

const ALL_REVIEWS: &str = "  - route:\n    - destination: {host: reviews}\n";

#[test]
fn an_endpoint_answering_5xx_is_ejected_then_returns_after_its_ejection_time() {
    let routes = format!("{}{OUTLIERS}", vs(ALL_REVIEWS));
    let m = mesh(
        &routes,
        Backends::Roles([answer("reviews-v1", 200, 0), answer("reviews-v2", 500, 0), answer("reviews-v3", 200, 0)]),
    );
    // Round robin reaches v2 within three requests; its 500 ejects it.
    let first = get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], 3, WAIT).unwrap();
    assert_eq!(first.iter().filter(|(s, _)| *s == 500).count(), 1, "{first:?}");
    let during = get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], 30, WAIT).unwrap();
    assert!(during.iter().all(|(s, _)| *s == 200), "the ejected endpoint got traffic: {during:?}");
    assert_eq!(m.apps[1].received().len(), 1, "v2 was sent nothing while ejected");
    std::thread::sleep(Duration::from_millis(3200));
    let after = get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], 6, WAIT).unwrap();
    assert!(after.iter().any(|(s, _)| *s == 500), "v2 is back after its ejection time: {after:?}");
}

#[test]
fn max_ejection_percent_keeps_a_failing_endpoint_in_rotation() {
    // Two of three endpoints fail, but at most 34% may be ejected: only one of them is.
    let routes =
        format!("{}{}", vs(ALL_REVIEWS), OUTLIERS.replace("maxEjectionPercent: 100", "maxEjectionPercent: 34"));
    let m = mesh(
        &routes,
        Backends::Roles([answer("reviews-v1", 200, 0), answer("reviews-v2", 500, 0), answer("reviews-v3", 500, 0)]),
    );
    let answers = get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], 30, WAIT).unwrap();
    let failed = answers.iter().filter(|(s, _)| *s == 500).count();
    assert!(failed >= 5, "a failing endpoint stays in rotation: {failed} of 30 failed");
    let (v2, v3) = (m.apps[1].received().len(), m.apps[2].received().len());
    assert!(v2.min(v3) <= 1 && v2.max(v3) >= 5, "one ejected, one kept: v2 got {v2}, v3 got {v3}");
}

/// Locality-aware balancing, on as Istio turns it on: [`OUTLIERS`] plus `localityLbSetting`.
fn locality_rule() -> String {
    OUTLIERS.replace("{simple: ROUND_ROBIN}", "{simple: ROUND_ROBIN, localityLbSetting: {enabled: true}}")
}

#[test]
fn healthy_local_endpoints_take_all_traffic_from_the_waypoints_zone() {
    let m = mesh_in_zones(&format!("{}{}", vs(ALL_REVIEWS), locality_rule()), Backends::Echo);
    let answers = get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], 30, WAIT).unwrap();
    assert_eq!(version_counts(&answers), [0, 30, 0, 0], "v1 shares the waypoint's zone; v2 and v3 are in zone-1");
}

#[test]
fn locality_failover_moves_traffic_to_the_next_zone_when_the_local_endpoint_is_ejected() {
    let m = mesh_in_zones(
        &format!("{}{}", vs(ALL_REVIEWS), locality_rule()),
        Backends::Roles([answer("reviews-v1", 500, 0), answer("reviews-v2", 200, 0), answer("reviews-v3", 200, 0)]),
    );
    // The local endpoint takes the first request; its 500 ejects it.
    let first = get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], WAIT).unwrap();
    assert_eq!((first.0, first.1.trim()), (500, "reviews-v1"), "the first request stays in the waypoint's zone");
    let during = get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], 30, WAIT).unwrap();
    assert!(during.iter().all(|(s, _)| *s == 200), "traffic failed over to zone-1: {during:?}");
    let (v2, v3) = (m.apps[1].received().len(), m.apps[2].received().len());
    assert_eq!(v2 + v3, 30, "zone-1 took every request while v1 was ejected");
    assert!(v2 >= 5 && v3 >= 5, "both zone-1 endpoints share the load: v2 {v2}, v3 {v3}");
    assert_eq!(m.apps[0].received().len(), 1, "the ejected local endpoint got nothing more");
    // Its ejection over, the local endpoint is preferred again.
    std::thread::sleep(Duration::from_millis(3200));
    let back = get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], WAIT).unwrap();
    assert_eq!((back.0, back.1.trim()), (500, "reviews-v1"), "traffic returns to the local zone");
}

#[test]
fn consistent_hash_by_header_keeps_each_user_on_one_endpoint() {
    let dr = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-hash}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: end-user}
";
    let m = mesh(&format!("{}{dr}", vs(ALL_REVIEWS)), Backends::Echo);
    let mut spread = std::collections::BTreeSet::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let answers =
            get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[("end-user", user)], 10, WAIT).unwrap();
        let versions: std::collections::BTreeSet<String> = answers.iter().map(|(_, b)| b.trim().to_string()).collect();
        assert_eq!(versions.len(), 1, "{user} moved between endpoints: {versions:?}");
        spread.extend(versions);
    }
    assert!(spread.len() >= 2, "six users all hashed to one endpoint: {spread:?}");
}

/// An HTTPRoute (Gateway API, GAMMA) attached to the `reviews` Service's port with `rules`.
fn httproute(rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: reviews\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: reviews, port: {PORT}}}\n  rules:\n{rules}"
    )
}

#[test]
fn httproute_on_the_reviews_service_splits_by_weight_within_five_sigma_over_1000_requests() {
    let m = mesh(
        &httproute("  - backendRefs:\n    - {name: reviews-v1, port: 9080, weight: 75}\n    - {name: reviews-v3, port: 9080, weight: 25}\n"),
        Backends::Echo,
    );
    assert_75_25_split_of_v1_and_v3(&m);
}

#[test]
fn httproute_header_match_sends_jason_to_v2_and_everyone_else_to_v1() {
    let m = mesh(
        &httproute("  - matches:\n    - headers: [{name: end-user, value: jason}]\n    backendRefs: [{name: reviews-v2, port: 9080}]\n  - backendRefs: [{name: reviews-v1, port: 9080}]\n"),
        Backends::Echo,
    );
    assert_jason_on_v2_and_jasonx_on_v1(&m);
}

#[test]
fn httproute_request_header_modifier_and_url_rewrite_reach_the_app_changed() {
    let m = mesh(
        &httproute("  - matches: [{path: {type: PathPrefix, value: /reviews}}]\n    filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        set: [{name: x-routed, value: gamma}]\n        add: [{name: x-added, value: one}]\n        remove: [x-drop]\n    - type: URLRewrite\n      urlRewrite:\n        hostname: reviews.internal\n        path: {type: ReplacePrefixMatch, replacePrefixMatch: /api/reviews}\n    backendRefs: [{name: reviews-v1, port: 9080}]\n"),
        Backends::Echo,
    );
    let (status, body, _) =
        get(&m.client, reviews(), "/reviews/7?x=1", "reviews:9080", &[("x-drop", "secret")], WAIT).unwrap();
    assert_eq!((status, body.trim()), (200, "reviews-v1"));
    let seen = &m.apps[0].received()[0];
    assert_eq!(seen.path, "/api/reviews/7?x=1", "the matched prefix replaced, the rest and the query kept");
    assert_eq!(seen.host, "reviews.internal");
    assert_eq!(seen.header("x-routed"), Some("gamma"));
    assert_eq!(seen.header("x-added"), Some("one"));
    assert_eq!(seen.header("x-drop"), None);
}

#[test]
fn httproute_takes_precedence_over_a_virtual_service_for_the_same_service() {
    let routes = format!("{}---\n{}", vs(ALL_V1), httproute("  - backendRefs: [{name: reviews-v3, port: 9080}]\n"));
    let m = mesh(&routes, Backends::Echo);
    let answers = get_many(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], 20, WAIT).unwrap();
    assert_eq!(version_counts(&answers), [0, 0, 0, 20], "the HTTPRoute decides, not the VirtualService");
}

#[test]
fn httproute_with_no_matching_rule_is_404_route_not_found() {
    let m = mesh(
        &httproute("  - matches: [{path: {type: Exact, value: /reviews/0}}]\n    backendRefs: [{name: reviews-v1, port: 9080}]\n"),
        Backends::Echo,
    );
    let (status, _, _) = get(&m.client, reviews(), "/other", "reviews:9080", &[], WAIT).unwrap();
    assert_eq!(status, 404);
    assert!(m.apps.iter().all(|a| a.received().is_empty()), "no app was reached");
    assert_eq!(
        m.waypoint
            .wait_metric("istio_requests_total", &[("response_flags", "NR"), ("response_code", "404")], 1.0)
            .unwrap(),
        1.0
    );
}

#[test]
fn tcproute_on_tcp_echo_relays_the_tunnel_to_its_backend_service() {
    let routes = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata:\n  name: tcp-echo\nspec:\n  parentRefs:\n  - {group: \"\", kind: Service, name: tcp-echo, port: 9000}\n  rules:\n  - backendRefs: [{name: tcp-echo-v2, port: 9000}]\n";
    let m = mesh(routes, Backends::Echo);
    let dst = vip(TCP_ECHO_VIP, TCP_PORT);
    for _ in 0..5 {
        let answer = m.client.run(move || {
            use std::io::BufRead;
            let mut s = TcpStream::connect_timeout(&dst, WAIT).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.write_all(b"hello\n").unwrap();
            let mut line = String::new();
            std::io::BufReader::new(s).read_line(&mut line).unwrap();
            line
        });
        assert_eq!(answer, "two hello\n", "tcp-echo v2 answers");
    }
    assert!(m.apps[4].received().is_empty(), "tcp-echo v1 was reached");
    assert_eq!(m.apps[5].received().len(), 5);
}

#[test]
fn serving_threads_share_one_listener_and_the_waypoint_serves_through_them() {
    let m = mesh(&vs(ALL_V1), Backends::Echo);
    let pid = m.waypoint.pid();
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    let workers = std::env::var("WAYPOINT_WORKER_THREADS").ok().and_then(|w| w.parse().ok()).unwrap_or(2usize);
    for i in 0..workers {
        assert!(threads.contains(&format!("waypoint-{i}")), "no serving thread waypoint-{i} in {threads:?}");
    }
    let listening = mesh_tests::listening_sockets(&m.waypoint_pod).unwrap();
    assert_eq!(
        listening.iter().filter(|&&p| p == 15008).count(),
        1,
        "one listening socket, shared by the serving threads: {listening:?}"
    );
    for _ in 0..20 {
        let (status, body, _) = get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], WAIT).unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("reviews-v1"), "{body}");
    }
}

#[test]
fn no_other_socket_in_the_waypoint_pod_can_bind_its_hbone_port() {
    use nix::sys::socket::{bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    let m = mesh(&vs(ALL_V1), Backends::Echo);
    let pod_ip = m.waypoint_pod.ip4();
    // With SO_REUSEPORT on both sides the kernel would let a same-user socket join the port
    // group, or bind the pod's own address and take every IPv4 connection.
    let refused: Vec<(Ipv4Addr, Option<nix::errno::Errno>)> = m.waypoint_pod.run(move || {
        [Ipv4Addr::UNSPECIFIED, pod_ip]
            .into_iter()
            .map(|ip| {
                let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::empty(), None).unwrap();
                setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
                setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
                (ip, bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(SocketAddrV4::new(ip, 15008))).err())
            })
            .collect()
    });
    for (ip, err) in refused {
        assert_eq!(err, Some(nix::errno::Errno::EADDRINUSE), "binding {ip}:15008 beside the waypoint");
    }
    let (status, _, _) = get(&m.client, reviews(), "/reviews/0", "reviews:9080", &[], WAIT).unwrap();
    assert_eq!(status, 200);
}
