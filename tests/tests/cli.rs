//! The real `ztunnel node` binary: a crashed agent leaves capture in place (fail closed),
//! and `ztunnel node --uninstall` removes every link and pin it left.
use std::net::SocketAddr;
use std::path::Path;

use mesh_tests::agent_process::{cluster_args, ztunnel_binary, AgentProcess};
use mesh_tests::apps::{request, PeerServer};
use mesh_tests::mesh::{ca_dir, kernel_link_ids, sweep_pins, BPFFS};
use mesh_tests::Cluster;
use ztunnel::redirect::pinned_link_ids;

#[test]
fn crashed_agent_keeps_pods_captured_and_cli_uninstall_removes_everything() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(0, "server").unwrap();
    let extra = cluster_args(&c, None, &[]).unwrap();
    let mut agent = AgentProcess::start(ztunnel_binary(), &c, 0, &extra).expect("ztunnel node");
    agent.enroll(&client).unwrap();
    let _app = PeerServer::start(&server, 8080).unwrap();
    let dst = SocketAddr::new(server.ip4().into(), 8080);
    let r = request(&client, dst, "through the proxy").unwrap();
    assert_eq!(
        r.peer.ip(),
        std::net::IpAddr::from(client.ip4()),
        "server not enrolled: reached directly from the client pod"
    );

    let pin_dir = Path::new(BPFFS).join(format!("{}-node0", c.prefix()));
    let links = pinned_link_ids(&pin_dir);
    assert_eq!(links.len(), 4, "3 cgroup links + 1 pod link");

    agent.crash();
    let live = kernel_link_ids();
    assert!(links.iter().all(|id| live.contains(id)), "capture must outlive the agent");
    assert!(
        request(&client, dst, "while the agent is down").is_err(),
        "fail closed: no unproxied traffic while enrolled"
    );

    agent.uninstall().unwrap();
    let live = kernel_link_ids();
    for id in &links {
        assert!(!live.contains(id), "link {id} still attached after `ztunnel node --uninstall`");
    }
    assert!(!pin_dir.exists(), "pins left in {}", pin_dir.display());
    let r = request(&client, dst, "after uninstall").unwrap();
    assert_eq!(r.got, "after uninstall", "uncaptured traffic flows again");
    let _ = std::fs::remove_dir_all(ca_dir(&c));
}

#[test]
fn a_missing_local_config_stops_the_agent_before_it_installs_anything() {
    sweep_pins();
    let c = Cluster::new(1).expect("mini-cluster (needs root)");
    let pin_dir = Path::new(BPFFS).join(format!("{}-missingcfg", c.prefix()));
    let missing = format!("/run/ztunnel-test/{}-no-such-config.yaml", c.prefix());
    let out = std::process::Command::new(ztunnel_binary())
        .args(["node", "--local-config", &missing, "--pin-dir", &pin_dir.display().to_string()])
        .args(["--enrollment-socket", &format!("/run/ztunnel-test/{}-missingcfg.sock", c.prefix())])
        .args(["--state-dir", &format!("/run/ztunnel-test/{}-missingcfg-pods", c.prefix())])
        .args(["--ca-state-dir", &ca_dir(&c).display().to_string()])
        .args(["--admin-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0"])
        .output()
        .expect("running ztunnel node");
    let _ = std::fs::remove_dir_all(format!("/run/ztunnel-test/{}-missingcfg-pods", c.prefix()));
    let _ = std::fs::remove_dir_all(ca_dir(&c));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "agent started without its config file");
    assert!(stderr.contains(&missing), "error does not name the file: {stderr}");
    assert!(!pin_dir.exists(), "capture was installed before the config was read");
}

#[test]
fn a_kernel_missing_a_capture_feature_stops_the_agent_naming_the_feature() {
    sweep_pins();
    let c = Cluster::new(1).expect("mini-cluster (needs root)");
    let pin_dir = Path::new(BPFFS).join(format!("{}-oldkernel", c.prefix()));
    let feature = "helper:get_netns_cookie@sock_ops";
    let out = std::process::Command::new(ztunnel_binary())
        .args(["node", "--simulate-missing-kernel-feature", feature, "--pin-dir", &pin_dir.display().to_string()])
        .args(["--enrollment-socket", &format!("/run/ztunnel-test/{}-oldkernel.sock", c.prefix())])
        .args(["--state-dir", &format!("/run/ztunnel-test/{}-oldkernel-pods", c.prefix())])
        .args(["--ca-state-dir", &ca_dir(&c).display().to_string()])
        .args(["--admin-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0"])
        .output()
        .expect("running ztunnel node");
    let _ = std::fs::remove_dir_all(format!("/run/ztunnel-test/{}-oldkernel-pods", c.prefix()));
    let _ = std::fs::remove_dir_all(ca_dir(&c));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "agent started on a kernel missing {feature}");
    assert!(stderr.contains(feature) && stderr.contains("5.15"), "error does not name the feature: {stderr}");
    assert!(!pin_dir.exists(), "capture was installed before the kernel was checked");
}
