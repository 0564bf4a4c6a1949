//! `ztunnel ctl` (the real binary) against a running node agent: each resource shows what
//! the agent holds, `-o json` of every command is the agent's own data, a live connection
//! is listed while it is open and gone once it closes, log levels change, and an agent that
//! is not there is a clear error and a failing exit code.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use mesh_tests::agent_process::ztunnel_binary;
use mesh_tests::benchkit::{start_server, PORT as ECHO_PORT};
use mesh_tests::control_plane::ControlPlane;
use mesh_tests::loadgen::EchoServer;
use mesh_tests::mesh::{sweep_pins, workload_yaml, write_mesh_config, MeshNode};
use mesh_tests::{Cluster, InNetns};
use serde_json::Value;
use ztunnel::redirect::Exclusions;

const WAIT: Duration = Duration::from_secs(5);

struct Ctl {
    admin: String,
    pod: mesh_tests::Pod,
    client: mesh_tests::Pod,
    node: MeshNode,
    c: Cluster,
}

fn id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// A one-node mesh from local config: `shop` (behind the `shop` service) and `client`, both
/// enrolled; the `only-me` policy lets only `client`'s identity into the namespace.
fn agent() -> Ctl {
    agent_with(true)
}

/// [`agent`], with the same-node fast path as `fast` says (off: `client` reaches `shop`
/// through the HBONE pool, as across nodes).
fn agent_with(fast: bool) -> Ctl {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let pod = c.add_pod(0, "shop").unwrap();
    let client = c.add_pod(0, "client").unwrap();
    let node = if fast {
        MeshNode::start(&c, 0, Exclusions::default()).unwrap()
    } else {
        MeshNode::start_without_fast_path(&c, 0).unwrap()
    };
    let yaml = format!(
        "workloads:\n{}{}services:\n- name: shop\n  namespace: default\n  hostname: shop.default.svc.cluster.local\n  vips: [\"10.96.9.9\"]\n  ports:\n    80: 8080\npolicies:\n- name: only-me\n  namespace: default\n  action: Allow\n  rules:\n  - clauses:\n    - matches:\n      - principals: [\"cluster.local/ns/default/sa/client\"]\n",
        workload_yaml(&pod, "default", "shop", ""),
        workload_yaml(&client, "default", "client", ""),
    );
    write_mesh_config(&c, &yaml, &[&node]).unwrap();
    node.enroll_as(&pod, "default", "shop").unwrap();
    node.enroll_as(&client, "default", "client").unwrap();
    let admin = node.agent().admin().expect("admin server").admin_addr.to_string();
    Ctl { admin, pod, client, node, c }
}

fn ctl(admin: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(ztunnel_binary()).arg("ctl").arg("--admin").arg(admin).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ztunnel ctl -o json <args>`, which must succeed and print JSON.
fn json(admin: &str, args: &[&str]) -> Value {
    let (ok, out, err) = ctl(admin, &[&["-o", "json"], args].concat());
    assert!(ok, "ctl {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl -o json {args:?} printed no JSON ({e}): {out}"))
}

/// Retries `ctl -o json <args>` until `pred` holds (state the agent builds on demand, like
/// certificates, or a connection's teardown); the last answer either way.
fn json_until(admin: &str, args: &[&str], pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = json(admin, args);
        if pred(&v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An echo server in `shop`, and a connection to it from `client` (through both proxies,
/// in HBONE) that has carried one round trip and stays open until dropped.
fn open_connection(a: &Ctl) -> (EchoServer, TcpStream) {
    let server = start_server(&a.pod).unwrap();
    let dst = SocketAddr::new(a.pod.ip4().into(), ECHO_PORT);
    let s = a.client.run(move || TcpStream::connect_timeout(&dst, WAIT)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    (&s).write_all(b"Eping").unwrap();
    let mut back = [0u8; 4];
    (&s).read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping", "the echo came back through the mesh");
    (server, s)
}

fn array<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("{what} is not a list: {v}"))
}

#[test]
fn each_resource_shows_what_the_agent_holds() {
    let a = agent();
    let (ok, out, err) = ctl(&a.admin, &["workloads"]);
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.contains("shop") && l.contains("HBONE")), "{out}");
    let (_, out, _) = ctl(&a.admin, &["services"]);
    assert!(out.contains("shop.default.svc.cluster.local") && out.contains("10.96.9.9"), "{out}");
    let (_, out, _) = ctl(&a.admin, &["policies"]);
    assert!(out.lines().any(|l| l.contains("only-me") && l.contains("Allow")), "{out}");
    let (_, out, _) = ctl(&a.admin, &["pods"]);
    assert!(out.contains("shop"), "{out}");
    // Certificates are fetched on first use: a connection to the pod's HBONE port asks for one.
    let hbone = std::net::SocketAddr::new(a.pod.ip4().into(), 15008);
    let _ = a.c.node(0).run(move || std::net::TcpStream::connect_timeout(&hbone, std::time::Duration::from_secs(2)));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut out = String::new();
    while std::time::Instant::now() < deadline {
        out = ctl(&a.admin, &["certificates"]).1;
        if out.contains("available") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(out.contains("spiffe://cluster.local/ns/default/sa/shop") && out.contains("available"), "{out}");
    assert!(out.contains(" in 23h") || out.contains(" in 24h"), "expiry shown: {out}");
    let (_, out, _) = ctl(&a.admin, &["ebpf"]);
    assert!(out.contains("connect4") && out.contains("sock_ops"), "{out}");
}

#[test]
fn certificates_table_shows_the_trust_chain_up_to_the_root() {
    let a = agent();
    let (_server, _conn) = open_connection(&a);
    let (ok, out, err) = ctl(&a.admin, &["certificates"]);
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.contains(&id("shop"))).unwrap_or_else(|| panic!("no shop row: {out}"));
    assert!(row.contains("O=cluster.local (root)"), "the mesh root anchors the chain: {out}");
    assert!(row.contains(" ago"), "valid-since shown: {out}");
}

#[test]
fn ebpf_table_shows_the_attached_links_and_enrolled_pods() {
    let a = agent();
    let (ok, out, err) = ctl(&a.admin, &["ebpf"]);
    assert!(ok, "{err}");
    let cgroup = mesh_tests::cgroup2_root().unwrap().display().to_string();
    let connect4 = out.lines().find(|l| l.contains("capture_connect4")).unwrap_or_else(|| panic!("{out}"));
    assert!(connect4.contains("cgroup/connect4") && connect4.contains(&cgroup), "{out}");
    let steer = format!("netns of pod {}", a.pod.uid());
    assert!(out.lines().any(|l| l.contains("steer_inbound") && l.contains(&steer)), "{out}");
    assert!(out.contains("ENROLLED PODS") && out.lines().any(|l| l.contains(a.client.uid())), "{out}");
}

#[test]
fn a_live_connection_is_listed_while_open_and_gone_after_it_closes() {
    let a = agent();
    let (_server, conn) = open_connection(&a);
    let src = conn.local_addr().unwrap().to_string();
    let dst = SocketAddr::new(a.pod.ip4().into(), ECHO_PORT).to_string();
    let (ok, out, err) = ctl(&a.admin, &["connections"]);
    assert!(ok, "{err}");
    let outbound = out
        .lines()
        .find(|l| l.starts_with("outbound") && l.contains(&src))
        .unwrap_or_else(|| panic!("client's outbound connection not listed: {out}"));
    assert!(outbound.contains(&dst) && outbound.contains("HBONE"), "{out}");
    assert!(outbound.contains(&id("client")) && outbound.contains(&id("shop")), "{out}");
    let inbound = out
        .lines()
        .find(|l| l.starts_with("inbound ") && l.contains(&dst))
        .unwrap_or_else(|| panic!("shop's inbound side not listed: {out}"));
    assert!(inbound.contains(&id("client")) && inbound.contains("HBONE"), "{out}");

    drop(conn);
    let deadline = Instant::now() + WAIT;
    let mut out = String::new();
    while Instant::now() < deadline {
        out = ctl(&a.admin, &["connections"]).1;
        if !out.contains(&dst) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!out.contains(&dst), "closed connection still listed: {out}");
    assert!(out.starts_with("DIRECTION"), "the table is still printed: {out}");
}

#[test]
fn json_output_is_the_agents_own_data() {
    let a = agent();
    let (ok, out, err) = ctl(&a.admin, &["-o", "json", "workloads"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v.as_array().unwrap().iter().any(|w| w["name"] == "shop"), "{v}");
    let (ok, out, _) = ctl(&a.admin, &["-o", "yaml", "services"]);
    assert!(ok && out.contains("hostname: shop.default.svc.cluster.local"), "{out}");
}

#[test]
fn json_output_of_workloads() {
    let a = agent();
    let v = json(&a.admin, &["workloads"]);
    let shop = array(&v, "workloads").iter().find(|w| w["name"] == "shop").unwrap_or_else(|| panic!("{v}"));
    assert_eq!(shop["uid"], a.pod.uid());
    assert_eq!(shop["serviceAccount"], "shop");
    assert!(array(&shop["workloadIps"], "workloadIps").contains(&Value::from(a.pod.ip4().to_string())), "{v}");
    assert!(array(&v, "workloads").iter().any(|w| w["uid"] == a.client.uid()), "{v}");
}

#[test]
fn json_output_of_services() {
    let a = agent();
    let v = json(&a.admin, &["services"]);
    let shop = &array(&v, "services")[0];
    assert_eq!(shop["hostname"], "shop.default.svc.cluster.local");
    assert!(shop["vips"].to_string().contains("10.96.9.9"), "{v}");
    assert!(shop["ports"].to_string().contains("8080"), "{v}");
}

#[test]
fn json_output_of_policies() {
    let a = agent();
    let v = json(&a.admin, &["policies"]);
    let p = &array(&v["policies"], "policies")[0];
    assert_eq!((&p["name"], &p["namespace"]), (&Value::from("only-me"), &Value::from("default")), "{v}");
    assert!(p["rules"].to_string().contains("cluster.local/ns/default/sa/client"), "the allowed principal: {v}");
    assert!(array(&v["invalidPolicies"], "invalidPolicies").is_empty(), "{v}");
}

#[test]
fn json_output_of_certificates() {
    let a = agent();
    let (_server, _conn) = open_connection(&a);
    let v = json_until(&a.admin, &["certificates"], |v| {
        v.as_array().is_some_and(|c| c.iter().any(|c| c["identity"] == id("shop") && c["state"] == "available"))
    });
    let shop = array(&v, "certificates").iter().find(|c| c["identity"] == id("shop")).unwrap_or_else(|| panic!("{v}"));
    assert_eq!(shop["state"], "available", "{v}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(shop["not_before_unix"].as_u64().unwrap() <= now && shop["not_after_unix"].as_u64().unwrap() > now);
    let chain = array(&shop["chain"], "chain");
    assert_eq!(chain[0]["serial"], shop["serial"], "the chain starts with the served leaf: {v}");
    let root = chain.last().unwrap();
    assert_eq!((&root["root"], &root["subject"]), (&Value::Bool(true), &Value::from("O=cluster.local")), "{v}");
    assert!(array(&v, "certificates").iter().any(|c| c["identity"] == id("client")), "{v}");
}

#[test]
fn json_output_of_pods() {
    let a = agent();
    let v = json(&a.admin, &["pods"]);
    let shop = array(&v, "pods").iter().find(|p| p["uid"] == a.pod.uid()).unwrap_or_else(|| panic!("{v}"));
    assert_eq!((&shop["namespace"], &shop["serviceAccount"]), (&Value::from("default"), &Value::from("shop")));
    assert!(shop["ips"].to_string().contains(&a.pod.ip4().to_string()), "{v}");
    assert!(shop["netnsCookie"].as_u64().is_some_and(|c| c > 0), "{v}");
}

#[test]
fn json_output_of_pool() {
    let a = agent_with(false);
    let (_server, _conn) = open_connection(&a);
    let v = json(&a.admin, &["pool"]);
    assert!(v["connections_opened"].as_u64().is_some_and(|n| n >= 1), "{v}");
    assert!(v["active_streams"].as_u64().is_some_and(|n| n >= 1), "the open connection's tunnel: {v}");
}

#[test]
fn json_output_of_ebpf() {
    let a = agent();
    let (_server, _conn) = open_connection(&a);
    let v = json(&a.admin, &["ebpf"]);
    assert!(v["counters"]["connect4"]["captured"].as_u64().is_some_and(|n| n >= 1), "{v}");
    let links = array(&v["links"], "links");
    let connect4 = links.iter().find(|l| l["program"] == "capture_connect4").unwrap_or_else(|| panic!("{v}"));
    assert_eq!(connect4["attachPoint"], mesh_tests::cgroup2_root().unwrap().display().to_string());
    let kernel_ids = a.node.link_ids();
    for l in links {
        let link_id = l["linkId"].as_u64().unwrap_or_else(|| panic!("no kernel id: {l}"));
        assert!(kernel_ids.contains(&(link_id as u32)), "{l} is not one of the agent's links {kernel_ids:?}");
    }
    assert!(links.iter().any(|l| l["program"] == "steer_inbound" && l["pod"] == a.pod.uid()), "{v}");
    assert!(array(&v["enrolledPods"], "enrolledPods").iter().any(|p| p["uid"] == a.client.uid()), "{v}");
}

#[test]
fn json_output_of_xds() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let pod = c.add_pod(0, "shop").unwrap();
    let cp = ControlPlane::start_ambient(&c, &[(&pod, 0)]);
    let node = MeshNode::start_with_control_plane(&c, 0, &cp.access).unwrap();
    let admin = node.agent().admin().expect("admin server").admin_addr.to_string();
    let address = ztunnel::xds::client::TYPE_URLS[0];
    let v = json_until(&admin, &["xds"], |v| v["synced"] == true && v["messages"][address].as_u64() >= Some(1));
    assert_eq!(v["synced"], true, "{v}");
    assert!(v["messages"][address].as_u64() >= Some(1), "address updates from the controller: {v}");
}

#[test]
fn json_output_of_connections() {
    let a = agent();
    let (_server, conn) = open_connection(&a);
    let src = conn.local_addr().unwrap().to_string();
    let v = json(&a.admin, &["connections"]);
    let list = array(&v["connections"], "connections");
    let out = list.iter().find(|c| c["direction"] == "outbound" && c["src"] == src).unwrap_or_else(|| panic!("{v}"));
    assert_eq!(out["dst"], SocketAddr::new(a.pod.ip4().into(), ECHO_PORT).to_string());
    assert_eq!((&out["protocol"], &out["pod"]), (&Value::from("HBONE"), &Value::from(a.client.uid())));
    assert_eq!((&out["srcIdentity"], &out["dstIdentity"]), (&Value::from(id("client")), &Value::from(id("shop"))));
    assert_eq!(
        (&out["srcWorkload"], &out["dstWorkload"]),
        (&Value::from("default/client"), &Value::from("default/shop"))
    );
    assert!(out["bytesSent"].as_u64() >= Some(5) && out["bytesReceived"].as_u64() >= Some(4), "{v}");
    assert!(list.iter().any(|c| c["direction"] == "inbound" && c["pod"] == a.pod.uid()), "{v}");
    assert_eq!(v["overflow"]["open"], 0, "{v}");
}

#[test]
fn json_output_of_log_level() {
    let a = agent();
    let (ok, _, err) = ctl(&a.admin, &["log-level", "info,ztunnel::proxy:debug"]);
    assert!(ok, "{err}");
    let v = json(&a.admin, &["log-level"]);
    assert_eq!(v["level"], "info,ztunnel::proxy=debug", "the agent's normalised filter: {v}");
}

#[test]
fn log_level_is_read_and_set() {
    let a = agent();
    let (ok, out, err) = ctl(&a.admin, &["log-level", "debug"]);
    assert!(ok, "{err}");
    assert!(out.contains("debug"), "{out}");
    let (_, out, _) = ctl(&a.admin, &["log-level"]);
    assert!(out.contains("debug"), "{out}");
    let (ok, _, err) = ctl(&a.admin, &["log-level", "not-a-level!"]);
    assert!(!ok && err.contains("400"), "{err}");
}

#[test]
fn an_agent_that_is_not_running_is_a_clear_error() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (ok, out, err) = ctl(&free, &["workloads"]);
    assert!(!ok, "exit code 0 with no agent: {out}");
    assert!(err.contains("cannot reach the agent's admin endpoint"), "{err}");
}

/// A free loopback port (bound, then released for the process under test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn ctl_reads_what_the_controller_serves() {
    let dir = std::env::temp_dir().join(format!("ctl-controller-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo");
    let admin = format!("127.0.0.1:{}", free_port());
    let mut controller = Command::new(ztunnel_binary())
        .args(["controller", "--listen", "127.0.0.1:0", "--admin-addr", &admin])
        .args(["--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0", "--config-dir"])
        .arg(&demo)
        .arg("--ca-state-dir")
        .arg(dir.join("ca"))
        .arg("--tokens-dir")
        .arg(dir.join("tokens"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut last = (false, String::new(), String::new());
    while std::time::Instant::now() < deadline {
        last = ctl(&admin, &["-o", "json", "workloads"]);
        if last.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (_, services, _) = ctl(&admin, &["services"]);
    let (_, policies, _) = ctl(&admin, &["-o", "json", "policies"]);
    let _ = controller.kill();
    let _ = controller.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(last.0, "ctl against the controller: {}", last.2);
    let workloads: serde_json::Value = serde_json::from_str(&last.1).unwrap();
    let names: Vec<&str> = workloads.as_array().unwrap().iter().filter_map(|w| w["namespace"].as_str()).collect();
    assert!(names.contains(&"bookinfo"), "the demo's workloads: {workloads}");
    assert!(services.contains("reviews.bookinfo.svc.cluster.local"), "{services}");
    let policies: serde_json::Value = serde_json::from_str(&policies).unwrap();
    assert!(!policies["policies"].as_array().unwrap().is_empty(), "{policies}");
}
