//! `ztunnel ctl` (the real binary) against a running node agent: each resource shows what
//! the agent holds, `-o json` is the agent's own data, log levels change, and an agent that
//! is not there is a clear error and a failing exit code.
use std::process::Command;

use mesh_tests::agent_process::ztunnel_binary;
use mesh_tests::mesh::{sweep_pins, workload_yaml, write_mesh_config, MeshNode};
use mesh_tests::{Cluster, InNetns};
use ztunnel::redirect::Exclusions;

struct Ctl {
    admin: String,
    pod: mesh_tests::Pod,
    _node: MeshNode,
    c: Cluster,
}

fn agent() -> Ctl {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let pod = c.add_pod(0, "shop").unwrap();
    let node = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    let yaml = format!(
        "workloads:\n{}services:\n- name: shop\n  namespace: default\n  hostname: shop.default.svc.cluster.local\n  vips: [\"10.96.9.9\"]\n  ports:\n    80: 8080\npolicies:\n- name: only-me\n  namespace: default\n  action: Allow\n  rules: []\n",
        workload_yaml(&pod, "default", "shop", "")
    );
    write_mesh_config(&c, &yaml, &[&node]).unwrap();
    node.enroll_as(&pod, "default", "shop").unwrap();
    let admin = node.agent().admin().expect("admin server").admin_addr.to_string();
    Ctl { admin, pod, _node: node, c }
}

fn ctl(admin: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(ztunnel_binary()).arg("ctl").arg("--admin").arg(admin).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
fn json_output_is_the_agents_own_data() {
    let a = agent();
    let (ok, out, err) = ctl(&a.admin, &["-o", "json", "workloads"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "shop");
    let (ok, out, _) = ctl(&a.admin, &["-o", "yaml", "services"]);
    assert!(ok && out.contains("hostname: shop.default.svc.cluster.local"), "{out}");
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
