//! Scratch (helper experiment, to be removed): which capabilities does `ztunnel node` need?
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;

use mesh_tests::agent_process::{cluster_args, ztunnel_binary, AgentProcess};
use mesh_tests::apps::{request, PeerServer};
use mesh_tests::mesh::{sweep_pins, workload_yaml};
use mesh_tests::Cluster;

#[test]
fn caps_experiment() {
    let caps = std::env::var("CAPS").unwrap_or_else(|_| "bpf,net_admin,sys_admin".into());
    let bounding: String = caps.split(',').filter(|c| !c.is_empty()).map(|c| format!(",+{c}")).collect();
    let wrapper = std::env::temp_dir().join(format!("ztunnel-caps-{}", std::process::id()));
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --inh-caps=-all --bounding-set=-all{bounding} {} \"$@\"\n",
            ztunnel_binary().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let yaml = format!(
        "workloads:\n{}{}",
        workload_yaml(&client, "default", client.name(), ""),
        workload_yaml(&server, "default", server.name(), "")
    );
    let extra = cluster_args(&c, Some(&yaml), &[]).unwrap();
    let a0 = AgentProcess::start(&wrapper, &c, 0, &extra);
    println!("CAPS={caps} start a0: {:?}", a0.as_ref().err());
    let a0 = a0.unwrap();
    let a1 = AgentProcess::start(&wrapper, &c, 1, &extra).unwrap();
    let pid = a0.pid();
    println!(
        "{}",
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("Cap"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!("enroll client: {:?}", a0.enroll(&client));
    println!("enroll server: {:?}", a1.enroll(&server));
    let _srv = PeerServer::start(&server, 8080).unwrap();
    let r = request(&client, SocketAddr::new(server.ip4().into(), 8080), "hi");
    println!("request: {r:?}");
    drop((a0, a1));
    let _ = std::fs::remove_file(&wrapper);
    let _ = std::fs::remove_file(mesh_tests::mesh::mesh_config_path(&c));
    let _ = std::fs::remove_dir_all(mesh_tests::mesh::ca_dir(&c));
}
