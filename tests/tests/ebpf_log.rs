//! Kernel-side diagnostics: the capture programs' own log records (aya-log) reach the agent's
//! log only while `/logging` asks for `ztunnel::ebpf=debug`, switched at run time.
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use mesh_tests::agent_process::{cluster_args, ztunnel_binary, AgentProcess};
use mesh_tests::apps::{request, PeerServer};
use mesh_tests::mesh::{sweep_pins, workload_yaml};
use mesh_tests::Cluster;

/// Lines of the agent's log that came from the kernel programs.
fn kernel_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ztunnel::ebpf"))
        .map(str::to_string)
        .collect()
}

#[test]
fn kernel_logs_reach_the_agent_log_only_while_switched_on() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(0, "server").unwrap();
    let yaml = format!("workloads:\n{}", workload_yaml(&client, "default", "client", ""));
    let extra = cluster_args(&c, Some(&yaml), &[]).unwrap();
    let log = std::env::temp_dir().join(format!("{}-agent.log", c.prefix()));
    let agent = AgentProcess::start_logging_to(ztunnel_binary(), &c, 0, &extra, &log).expect("ztunnel node");
    agent.enroll(&client).unwrap();
    let _app = PeerServer::start(&server, 8080).unwrap();
    let dst = SocketAddr::new(server.ip4().into(), 8080);

    // Off by default: a captured connection leaves no kernel record.
    assert_eq!(request(&client, dst, "quiet").unwrap().got, "quiet");
    std::thread::sleep(Duration::from_millis(500));
    assert!(kernel_lines(&log).is_empty(), "kernel logged while off: {:?}", kernel_lines(&log));

    // On through /logging: the connect program says what it captured.
    let (status, body) = agent.admin("POST", "/logging?level=warn,ztunnel::ebpf=debug").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(request(&client, dst, "loud").unwrap().got, "loud");
    let want = format!("connect4 to {}:8080 captured", server.ip4());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !kernel_lines(&log).iter().any(|l| l.contains(&want)) {
        assert!(Instant::now() < deadline, "no kernel record {want:?} in: {:?}", kernel_lines(&log));
        std::thread::sleep(Duration::from_millis(100));
    }

    // Off again: no new records.
    let (status, _) = agent.admin("POST", "/logging?level=warn").unwrap();
    assert_eq!(status, 200);
    let before = kernel_lines(&log).len();
    assert_eq!(request(&client, dst, "quiet again").unwrap().got, "quiet again");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(kernel_lines(&log).len(), before, "kernel kept logging after being switched off");
    drop(agent);
    let _ = std::fs::remove_file(&log);
}
