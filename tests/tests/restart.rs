//! Replacing the real `ztunnel node` binary under load. A successor takes the pods and
//! their listening sockets from the running agent (no listener ever closes), the old agent
//! drains what it had accepted and exits: no request fails, no stream breaks, no new
//! connection is refused. After a SIGKILL, capture stays (fail closed) and traffic comes
//! back as soon as a new agent serves the re-Added pods; the gap is reported.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_tests::agent_process::{cluster_args, ztunnel_binary, AgentProcess};
use mesh_tests::loadgen::{blocking, EchoServer};
use mesh_tests::mesh::{sweep_pins, workload_yaml};
use mesh_tests::{Cluster, InNetns, Pod};

const PORT: u16 = 9000;

struct Rig {
    c: Cluster,
    client: Pod,
    server: Pod,
    agents: Vec<AgentProcess>,
    extra: Vec<String>,
    _echo: EchoServer,
}

fn rig() -> Rig {
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let yaml = format!(
        "workloads:\n{}{}",
        workload_yaml(&client, "default", client.name(), ""),
        workload_yaml(&server, "default", server.name(), "")
    );
    let extra = cluster_args(&c, Some(&yaml), &["--drain-timeout", "20"]).unwrap();
    let a0 = AgentProcess::start(ztunnel_binary(), &c, 0, &extra).expect("agent 0");
    let a1 = AgentProcess::start(ztunnel_binary(), &c, 1, &extra).expect("agent 1");
    a0.enroll(&client).unwrap();
    a1.enroll(&server).unwrap();
    let echo = EchoServer::spawn(server.run(|| TcpListener::bind(("::", PORT))).unwrap()).unwrap();
    Rig { c, client, server, agents: vec![a0, a1], extra, _echo: echo }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Agents first (their Drop uninstalls), then the cluster's config and CA files.
        self.agents.clear();
        let _ = std::fs::remove_file(mesh_tests::mesh::mesh_config_path(&self.c));
        let _ = std::fs::remove_dir_all(mesh_tests::mesh::ca_dir(&self.c));
    }
}

impl Rig {
    fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.server.ip4().into(), PORT)
    }
}

/// A long-lived connection that echoes a ping every 50 ms until told to stop; counts pings
/// and reports whether it ever broke.
fn stream(client: &Pod, dst: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Result<u64, String>> {
    let client = client.clone();
    std::thread::spawn(move || {
        let mut s =
            client.run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5))).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        s.write_all(b"E").map_err(|e| e.to_string())?;
        let mut pings = 0;
        while !stop.load(Ordering::Relaxed) {
            s.write_all(b"ping").map_err(|e| format!("after {pings} pings: {e}"))?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).map_err(|e| format!("after {pings} pings: {e}"))?;
            pings += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(pings)
    })
}

/// Opens, echoes and closes connections back to back until told to stop; returns failures.
fn churn(
    client: &Pod,
    dst: SocketAddr,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Vec<String>> {
    let client = client.clone();
    std::thread::spawn(move || {
        client.run(move || {
            let mut failures = vec![];
            while !stop.load(Ordering::Relaxed) {
                let r = (|| -> std::io::Result<()> {
                    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    s.write_all(b"Eping")?;
                    let mut buf = [0u8; 4];
                    s.read_exact(&mut buf)
                })();
                match r {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failures.push(e.to_string());
                        0
                    }
                };
                std::thread::sleep(Duration::from_millis(10));
            }
            failures
        })
    })
}

/// Replaces agent `i` with a new process under load and checks nothing failed.
fn replace_under_load(i: usize) {
    let mut r = rig();
    let dst = r.dst();
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..20).map(|_| stream(&r.client, dst, stop.clone())).collect();
    let new_ok = Arc::new(AtomicU64::new(0));
    let churner = churn(&r.client, dst, stop.clone(), new_ok.clone());
    let client = r.client.clone();
    let load =
        std::thread::spawn(move || client.run(move || blocking::latency(dst, 8, 500.0, Duration::from_secs(4), 1024)));

    std::thread::sleep(Duration::from_millis(1500));
    let successor = AgentProcess::start(ztunnel_binary(), &r.c, i, &r.extra).expect("successor agent");
    // Traffic keeps flowing across the handover for the rest of the load run.
    let result = load.join().unwrap().expect("load generator");
    stop.store(true, Ordering::Relaxed);
    let broken: Vec<String> = streams.into_iter().filter_map(|h| h.join().unwrap().err()).collect();
    let refused = churner.join().unwrap();
    // Its last connections closed: the old agent drains and exits well before its deadline.
    let exited = r.agents[i].wait_exit(Duration::from_secs(10));
    let bad: u64 = result.ret_codes.iter().filter(|(k, _)| k.as_str() != "OK").map(|(_, v)| *v).sum();
    let ok = result.ret_codes.get("OK").copied().unwrap_or(0);
    println!(
        "agent {i} replaced: {ok} requests OK, {bad} failed; 20 streams, {} broken; {} new connections OK, {} failed",
        broken.len(),
        new_ok.load(Ordering::Relaxed),
        refused.len()
    );
    assert_eq!(bad, 0, "failed requests: {:?}", result.ret_codes);
    assert!(broken.is_empty(), "broken streams: {broken:?}");
    assert!(refused.is_empty(), "new connections failed: {refused:?}");
    assert!(ok > 1000, "load did not run: {:?}", result.ret_codes);
    assert!(exited.is_some_and(|s| s.success()), "old agent did not drain and exit cleanly: {exited:?}");
    // The successor serves new traffic on its own.
    let mut s = r.client.run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5))).unwrap();
    s.write_all(b"Eping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    r.agents[i] = successor;
}

#[test]
fn replacing_the_destination_agent_under_load_fails_nothing() {
    replace_under_load(1);
}

#[test]
fn replacing_the_source_agent_under_load_fails_nothing() {
    replace_under_load(0);
}

#[test]
fn after_sigkill_capture_fails_closed_until_a_new_agent_serves_the_re_added_pod() {
    let mut r = rig();
    let dst = r.dst();
    let killed = Instant::now();
    r.agents[1].crash();
    let try_once = |client: &Pod| {
        client.run(move || -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"Eping")?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf)
        })
    };
    assert!(try_once(&r.client).is_err(), "traffic reached the app with no agent: capture failed open");
    let successor = AgentProcess::start(ztunnel_binary(), &r.c, 1, &r.extra).expect("new agent");
    successor.enroll(&r.server).expect("re-Add");
    let mut first_ok = None;
    while killed.elapsed() < Duration::from_secs(20) {
        if try_once(&r.client).is_ok() {
            first_ok = Some(killed.elapsed());
            break;
        }
    }
    let gap = first_ok.expect("no traffic after the new agent came up");
    println!(
        "SIGKILL gap: {} ms from kill to the first successful connection (includes starting the new agent)",
        gap.as_millis()
    );
    r.agents[1] = successor;
}
