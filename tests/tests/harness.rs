//! Tests of the mini-cluster harness itself: real connectivity, subprocess
//! placement, cleanup, leftover sweeping and parallel construction.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use mesh_tests::{cgroup2_root, sweep_leftovers, Cluster, InNetns, Pod};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Builds the standard 2-node cluster with pods a0,b0 (node 0) and a1,b1 (node 1).
fn two_by_two() -> (Cluster, Vec<Pod>) {
    let mut c = Cluster::new(2).expect("Cluster::new");
    let pods = vec![
        c.add_pod(0, "a0").expect("add a0"),
        c.add_pod(0, "b0").expect("add b0"),
        c.add_pod(1, "a1").expect("add a1"),
        c.add_pod(1, "b1").expect("add b1"),
    ];
    (c, pods)
}

/// Listens on `server_ip:port` inside `server`, connects from `client`, and
/// checks a round trip plus that the server saw the client's real pod IP.
fn check_tcp(server: &Pod, server_ip: IpAddr, client: &Pod, client_ip: IpAddr, port: u16) {
    let addr = SocketAddr::new(server_ip, port);
    let listener =
        server.run(move || TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", server.name()));
    let accept = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("accept");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).expect("server read");
        s.write_all(b"pong").expect("server write");
        (peer, buf)
    });
    let reply = client.run(move || -> std::io::Result<[u8; 4]> {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)?;
        Ok(buf)
    });
    let reply = reply.unwrap_or_else(|e| panic!("{} -> {addr} from {}: {e}", client.name(), client_ip));
    assert_eq!(&reply, b"pong");
    let (peer, got) = accept.join().expect("accept thread");
    assert_eq!(&got, b"ping");
    assert_eq!(peer.ip(), client_ip, "server must see the client pod IP (no NAT)");
}

fn netns_listed(prefix: &str) -> Vec<String> {
    let out = Command::new("/usr/sbin/ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n == prefix || n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect()
}

#[test]
fn address_plan() {
    let (mut c, pods) = two_by_two();
    assert_eq!(pods[0].ip4().to_string(), "10.244.0.10");
    assert_eq!(pods[1].ip4().to_string(), "10.244.0.11");
    assert_eq!(pods[2].ip4().to_string(), "10.244.1.10");
    assert_eq!(pods[0].ip6(), "fd00:244:0::10".parse::<std::net::Ipv6Addr>().unwrap());
    assert_eq!(pods[3].ip6(), "fd00:244:1::11".parse::<std::net::Ipv6Addr>().unwrap());
    assert_eq!(c.node(1).gateway4().to_string(), "10.244.1.1");
    assert_eq!(c.node(1).gateway6(), "fd00:244:1::1".parse::<std::net::Ipv6Addr>().unwrap());
    assert_eq!(pods[2].node(), 1);
    assert_eq!(pods[2].uid(), format!("{}-a1", c.prefix()));
    assert!(c.add_pod(0, "a0").is_err(), "duplicate pod name must fail");
    assert!(c.add_pod(5, "zz").is_err(), "bad node index must fail");
    let root = cgroup2_root().unwrap();
    assert_eq!(pods[0].cgroup_path(), root.join(c.prefix()).join("a0"));
    assert!(pods[0].cgroup_path().is_dir());
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Pod>();
    assert_send_sync::<mesh_tests::Node>();
}

#[test]
fn cross_node_tcp_v4_and_v6() {
    let (_c, pods) = two_by_two();
    let (a0, b0, b1) = (&pods[0], &pods[1], &pods[3]);
    check_tcp(a0, a0.ip4().into(), b1, b1.ip4().into(), 8080);
    check_tcp(a0, a0.ip6().into(), b1, b1.ip6().into(), 8080);
    // Same node, both families.
    check_tcp(a0, a0.ip4().into(), b0, b0.ip4().into(), 8081);
    check_tcp(b0, b0.ip6().into(), a0, a0.ip6().into(), 8081);
}

#[test]
fn node_gateway_reaches_pod() {
    let (c, pods) = two_by_two();
    let a0 = pods[0].clone();
    let listener = a0.run(|| TcpListener::bind("0.0.0.0:9000")).unwrap();
    let t = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer.ip()));
    let dst = SocketAddr::new(a0.ip4().into(), 9000);
    c.node(0).run(move || TcpStream::connect_timeout(&dst, TIMEOUT)).unwrap();
    let peer = t.join().unwrap().unwrap();
    assert_eq!(peer, IpAddr::from(c.node(0).gateway4()), "probes come from the br0 address");
}

#[test]
fn run_async_and_spawn_thread() {
    let (_c, pods) = two_by_two();
    let server = pods[0].clone();
    let addr = SocketAddr::new(server.ip6().into(), 7000);
    // Long-lived in-process server on its own netns thread.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let srv = server.spawn_thread(move || {
        let l = TcpListener::bind(addr).unwrap();
        ready_tx.send(()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        v
    });
    ready_rx.recv_timeout(TIMEOUT).unwrap();
    let n = pods[3].run_async(move || async move {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"hello async").await.unwrap();
        s.shutdown().await.unwrap();
        11usize
    });
    assert_eq!(n, 11);
    assert_eq!(srv.join().unwrap(), b"hello async");

    // Panics propagate out of run().
    let p = pods[1].clone();
    let r = std::panic::catch_unwind(move || p.run(|| panic!("boom")));
    assert!(r.is_err());
}

#[test]
fn spawned_process_is_in_pod_cgroup_and_netns() {
    let (_c, pods) = two_by_two();
    let pod = &pods[2];
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "cat /proc/self/cgroup; readlink /proc/self/ns/net"]).stdout(Stdio::piped());
    let out = pod.spawn(cmd).unwrap().wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let rel = pod.cgroup_path().strip_prefix(cgroup2_root().unwrap()).unwrap();
    let want_cg = format!("0::/{}", rel.display());
    assert!(text.lines().any(|l| l == want_cg), "expected {want_cg:?} in:\n{text}");
    let ino = pod.netns_file().metadata().unwrap().ino();
    let want_ns = format!("net:[{ino}]");
    assert!(text.lines().any(|l| l == want_ns), "expected {want_ns:?} in:\n{text}");
    // And it is not our own netns.
    let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(mine.to_string_lossy(), want_ns);
}

#[test]
fn drop_cleans_up_netns_cgroups_and_processes() {
    let (c, pods) = two_by_two();
    let prefix = c.prefix().to_string();
    let names = c.netns_names().to_vec();
    assert_eq!(names.len(), 1 + 2 + 4);
    let mut listed = netns_listed(&prefix);
    listed.sort();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(listed, expected);

    let cluster_cg: PathBuf = c.cgroup_path().to_path_buf();
    let pod_cgs: Vec<PathBuf> = pods.iter().map(|p| p.cgroup_path().to_path_buf()).collect();
    // A process still running at drop time must not block cgroup removal.
    let mut cmd = Command::new("/bin/sleep");
    cmd.arg("1000");
    let mut child = pods[1].spawn(cmd).unwrap();

    drop(c);
    assert!(netns_listed(&prefix).is_empty(), "netns left: {:?}", netns_listed(&prefix));
    for cg in pod_cgs.iter().chain([&cluster_cg]) {
        assert!(!cg.exists(), "cgroup {} still exists", cg.display());
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "sleep should have been killed");
    // Pods may outlive the cluster without harm.
    assert_eq!(pods[0].name(), "a0");
}

#[test]
fn sweep_removes_leftovers_of_dead_processes() {
    // A pid that certainly existed and is now gone.
    let mut child = Command::new("/bin/true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let prefix = format!("zt{dead}x0");
    let ns = format!("{prefix}-fabric");
    let out = Command::new("/usr/sbin/ip").args(["netns", "add", &ns]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cg = cgroup2_root().unwrap().join(&prefix).join("p");
    std::fs::create_dir_all(&cg).unwrap();
    // Something alive in the leftover cgroup.
    let mut sleeper = Command::new("/bin/sh");
    sleeper.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec sleep 1000", cg.to_str().unwrap()]);
    let mut sleeper = sleeper.spawn().unwrap();
    // Wait until it moved itself.
    // (A concurrent test's Cluster::new may sweep it first; that is fine too.)
    for _ in 0..500 {
        match std::fs::read_to_string(cg.join("cgroup.procs")) {
            Ok(s) if s.trim().is_empty() => {}
            _ => break,
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    // Our own live cluster must survive the sweep.
    let live = Cluster::new(1).unwrap();
    sweep_leftovers();
    assert!(netns_listed(&prefix).is_empty(), "leftover netns not swept");
    assert!(!cg.parent().unwrap().exists(), "leftover cgroup not swept");
    assert!(!sleeper.wait().unwrap().success());
    assert_eq!(netns_listed(live.prefix()).len(), 2);
    assert!(live.cgroup_path().is_dir());
}

#[test]
fn two_clusters_concurrently() {
    let build = || {
        std::thread::spawn(|| {
            let mut c = Cluster::new(2).unwrap();
            let p0 = c.add_pod(0, "x").unwrap();
            let p1 = c.add_pod(1, "y").unwrap();
            check_tcp(&p0, p0.ip4().into(), &p1, p1.ip4().into(), 80);
            check_tcp(&p1, p1.ip6().into(), &p0, p0.ip6().into(), 80);
            c.prefix().to_string()
        })
    };
    let (t1, t2) = (build(), build());
    let (a, b) = (t1.join().unwrap(), t2.join().unwrap());
    assert_ne!(a, b);
    assert!(netns_listed(&a).is_empty() && netns_listed(&b).is_empty());
}
