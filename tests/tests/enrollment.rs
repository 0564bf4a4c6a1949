//! The enrollment socket under bad input: every bad request gets an `Ack` with a clear
//! error, and the agent keeps serving other pods. Also: two test processes at once.
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use mesh_tests::apps::{request, PeerServer};
use mesh_tests::mesh::{sweep_pins, wait_record, MeshNode};
use mesh_tests::{Cluster, InNetns};
use prost::Message;
use ztunnel::enrollment::{workload_request::Payload, AddWorkload, WorkloadInfo, WorkloadRequest};
use ztunnel::redirect::Exclusions;

fn add_bytes(uid: &str) -> Vec<u8> {
    WorkloadRequest {
        payload: Some(Payload::Add(AddWorkload {
            uid: uid.into(),
            workload_info: Some(WorkloadInfo {
                name: uid.into(),
                namespace: "default".into(),
                service_account: "sa".into(),
            }),
        })),
    }
    .encode_to_vec()
}

#[test]
fn bad_enrollment_requests_are_refused_with_reasons_and_the_agent_keeps_serving() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let a = c.add_pod(0, "a").unwrap();
    let b = c.add_pod(0, "b").unwrap();
    let node = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    let cni = node.client().unwrap();

    let err = cni.request(b"\xff\xfe garbage \x00\x01", &[]).unwrap().unwrap_err();
    assert!(err.contains("malformed request"), "{err}");

    let err = cni.request(&add_bytes(a.uid()), &[]).unwrap().unwrap_err();
    assert!(err.contains("expected exactly 1 network namespace fd, got 0"), "{err}");

    let not_netns = std::fs::File::open("/dev/null").unwrap();
    let err = cni.request(&add_bytes(a.uid()), &[not_netns.as_raw_fd()]).unwrap().unwrap_err();
    assert!(err.contains("not a network namespace"), "{err}");

    let err = cni.request(&add_bytes("bad/uid"), &[a.netns_file().as_raw_fd()]).unwrap().unwrap_err();
    assert!(err.contains("invalid pod uid"), "{err}");

    // A failed Add leaves nothing behind: the same pod enrolls cleanly afterwards.
    node.enroll(&a).unwrap();

    let err = cni.del("no-such-pod").unwrap().unwrap_err();
    assert!(err.contains("Del no-such-pod: unknown pod"), "{err}");

    // The same connection and the agent still work for other pods.
    node.enroll(&b).unwrap();
    let _app = PeerServer::start(&b, 8080).unwrap();
    let mut ev = node.events();
    let dst = SocketAddr::new(b.ip4().into(), 8080);
    let r = request(&a, dst, "still-serving").unwrap();
    assert_eq!(r.got, "still-serving");
    assert!(wait_record(&mut ev, Duration::from_secs(5), |r| r.dst == dst).is_some());
    let expected = 5 + mesh_tests::mesh::shortcut_links();
    assert_eq!(
        node.link_ids().len(),
        expected,
        "3 cgroup links + 2 pods (+ the shortcut's), nothing from the failed Adds"
    );
    let m = node.agent().metrics().encode();
    assert!(m.contains("ztunnel_enrollment_rejected_total 5"), "five bad requests counted:\n{m}");
}

/// A CNI re-sends every pod after a reconnect: the same pod in the same netns is acked (as
/// Istio's ztunnel does) and stays enrolled once.
#[test]
fn a_repeated_add_for_the_same_pod_and_netns_is_acknowledged_without_a_second_enrollment() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let a = c.add_pod(0, "a").unwrap();
    let node = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    node.enroll(&a).unwrap();
    let links = node.link_ids().len();
    node.enroll(&a).expect("the repeated Add is acked");
    assert_eq!(node.agent().pods(), vec![a.uid().to_string()]);
    assert_eq!(node.link_ids().len(), links, "no second sk_lookup link");
}

#[test]
fn a_subprocess_in_the_pod_cgroup_is_captured() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let a = c.add_pod(0, "a").unwrap();
    let b = c.add_pod(0, "b").unwrap();
    let node = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    node.enroll(&a).unwrap();
    node.enroll(&b).unwrap();
    let _app = PeerServer::start(&b, 8080).unwrap();
    let mut ev = node.events();
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(format!("exec 3<>/dev/tcp/{}/8080; echo from-bash >&3; head -1 <&3", b.ip4()));
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let out = a.spawn(cmd).unwrap().wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("peer=127.0.0.6:") && text.contains("got=from-bash"),
        "{text:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dst = SocketAddr::new(b.ip4().into(), 8080);
    assert!(wait_record(&mut ev, Duration::from_secs(5), |r| r.dst == dst
        && r.src.ip() == std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST))
    .is_some());
}

/// Runs the capture test binary's tests in two processes at the same time: each builds its
/// own clusters and agents, and both must pass.
#[test]
fn two_test_processes_at_once_do_not_interfere() {
    if std::env::var_os("ZT_CHILD").is_some() {
        return; // never recurse
    }
    let me = std::env::current_exe().unwrap();
    let spawn = || {
        Command::new(&me)
            .args([
                "--exact",
                "bad_enrollment_requests_are_refused_with_reasons_and_the_agent_keeps_serving",
                "--test-threads=1",
            ])
            .env("ZT_CHILD", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (p1, p2) = (spawn(), spawn());
    for p in [p1, p2] {
        let out = p.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("1 passed"), "{stdout}");
    }
}

#[test]
fn the_enrollment_and_handoff_sockets_refuse_other_users() {
    use std::os::unix::process::CommandExt;
    sweep_pins();
    let c = Cluster::new(1).expect("mini-cluster (needs root)");
    let node = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    let run_dir = node.enrollment_socket().parent().unwrap().to_path_buf();
    for sock in [node.enrollment_socket().to_path_buf(), run_dir.join("handoff.sock")] {
        let as_root = Command::new(env!("CARGO_BIN_EXE_uds_probe")).arg(&sock).output().unwrap();
        assert!(as_root.status.success(), "root could not connect to {}: {as_root:?}", sock.display());
        let nobody = Command::new(env!("CARGO_BIN_EXE_uds_probe")).arg(&sock).uid(65534).gid(65534).output().unwrap();
        assert!(
            !nobody.status.success(),
            "uid 65534 reached {}: {}",
            sock.display(),
            String::from_utf8_lossy(&nobody.stdout)
        );
    }
}

#[test]
fn uids_that_could_leave_the_state_directory_and_second_uids_for_one_netns_are_refused() {
    sweep_pins();
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let pod = c.add_pod(0, "pod").unwrap();
    let node = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    let cni = node.client().unwrap();
    let del = cni.del("../../../../etc/passwd").unwrap();
    assert!(del.as_ref().is_err_and(|e| e.contains("invalid pod uid")), "{del:?}");
    node.enroll(&pod).unwrap();
    let info = WorkloadInfo { name: "twin".into(), namespace: "default".into(), service_account: "twin".into() };
    let twin = cni.add("twin-uid", info, pod.netns_file()).unwrap();
    assert!(twin.as_ref().is_err_and(|e| e.contains("already enrolled as")), "{twin:?}");
    assert_eq!(node.agent().pods(), vec![pod.uid().to_string()]);
}
