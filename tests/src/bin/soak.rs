//! `cargo xtask soak`: what the node agent costs per connection and whether anything grows
//! without bound. Two release `ztunnel node` processes (source node, destination node), so
//! each side's RSS and fds are its own.
//!
//! Phases:
//! - `memory`: for captured plain TCP and for HBONE, hold N idle keep-alive connections
//!   (each echoed once) and report RSS and fds per connection on each agent; close them and
//!   report RSS after warm-up and after `--settle` seconds (should come back within 10%).
//! - `soak`: through HBONE, 10,000 concurrent idle connections, then 200,000 connections
//!   opened and closed, then `--minutes` of mixed load (latency, throughput, max rate),
//!   sampling RSS, fds and threads of both agents. RSS at the end should be within 10% of
//!   RSS after warm-up.
//!
//! Options: `--only memory|soak`, `--settle S` (default 60), `--minutes M` (default 30),
//! `--idle N` (default 10000), `--churn N` (default 200000). Results: `target/bench/soak.json`.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mesh_tests::agent_process::{cluster_args, AgentProcess};
use mesh_tests::loadgen::{blocking, EchoServer};
use mesh_tests::mesh::{sweep_pins, workload_yaml};
use mesh_tests::{sweep_leftovers, Cluster, InNetns, Pod};
use serde_json::json;

const PORT: u16 = 9000;

struct Opts {
    only: Option<String>,
    settle: u64,
    minutes: f64,
    idle: usize,
    churn: u64,
}

fn opts() -> Opts {
    let mut o = Opts { only: None, settle: 60, minutes: 30.0, idle: 10_000, churn: 200_000 };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        match (pair[0].as_str(), pair.get(1)) {
            ("--only", Some(v)) => o.only = Some(v.clone()),
            ("--settle", Some(v)) => o.settle = v.parse().unwrap_or(o.settle),
            ("--minutes", Some(v)) => o.minutes = v.parse().unwrap_or(o.minutes),
            ("--idle", Some(v)) => o.idle = v.parse().unwrap_or(o.idle),
            ("--churn", Some(v)) => o.churn = v.parse().unwrap_or(o.churn),
            _ => {}
        }
    }
    o
}

/// RSS, open fds and threads of one process.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Footprint {
    rss_kb: u64,
    /// Of `rss_kb`, anonymous memory (heap, stacks): what the agent allocated, as opposed
    /// to code and file pages.
    rss_anon_kb: u64,
    fds: u64,
    threads: u64,
}

fn footprint(a: &AgentProcess) -> Footprint {
    let pid = a.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
    Footprint { rss_kb: field("VmRSS:"), rss_anon_kb: field("RssAnon:"), fds, threads: field("Threads:") }
}

/// Opens `n` connections from inside `pod`, each echoed once, and keeps them open.
fn hold(pod: &Pod, dst: SocketAddr, n: usize) -> Result<Vec<TcpStream>> {
    pod.run(move || -> Result<Vec<TcpStream>> {
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            let mut s =
                TcpStream::connect_timeout(&dst, Duration::from_secs(5)).with_context(|| format!("connection {i}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"Eping")?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).with_context(|| format!("echo on connection {i}"))?;
            v.push(s);
        }
        Ok(v)
    })
}

fn raise_nofile() {
    let lim = libc::rlimit { rlim_cur: 262_144, rlim_max: 262_144 };
    // SAFETY: plain setrlimit on this process; children inherit it.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        eprintln!("soak: could not raise RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
    }
}

struct Rig {
    _c: Cluster,
    a0: AgentProcess,
    a1: AgentProcess,
    tcp: (Pod, SocketAddr),
    hbone: (Pod, SocketAddr),
    _servers: Vec<Server>,
}

/// The echo app as its own process inside the pod (10,000 connections need more fds than
/// one process may hold on both ends); killed when dropped.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(pod: &Pod) -> Result<Server> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["--serve-echo", &PORT.to_string()]);
    let child = pod.spawn(cmd)?;
    let dst = SocketAddr::new(pod.ip4().into(), PORT);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pod.run(move || TcpStream::connect_timeout(&dst, Duration::from_millis(200))).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "echo server in {} did not start", pod.name());
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Server(child))
}

/// `--serve-echo PORT`: serve the load generator's protocol on `[::]:PORT` until killed.
fn serve_echo(port: u16) -> Result<()> {
    let _server = EchoServer::spawn(TcpListener::bind(("::", port))?)?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn rig() -> Result<Rig> {
    let binary = std::env::current_exe()?.with_file_name("ztunnel");
    anyhow::ensure!(binary.exists(), "{} missing: run `cargo build --release -p ztunnel`", binary.display());
    let mut c = Cluster::new(2)?;
    let tcp_c = c.add_pod(0, "tcpc")?;
    let tcp_s = c.add_pod(1, "tcps")?;
    let mesh_c = c.add_pod(0, "meshc")?;
    let mesh_s = c.add_pod(1, "meshs")?;
    let yaml = format!(
        "workloads:\n{}{}",
        workload_yaml(&mesh_c, "default", mesh_c.name(), ""),
        workload_yaml(&mesh_s, "default", mesh_s.name(), "")
    );
    let extra =
        cluster_args(&c, Some(&yaml), &["--max-connections-per-pod", "65536", "--max-connections-per-peer", "65536"])?;
    let a0 = AgentProcess::start(&binary, &c, 0, &extra)?;
    let a1 = AgentProcess::start(&binary, &c, 1, &extra)?;
    let fresh = footprint(&a0);
    let t = Instant::now();
    for p in [&tcp_c, &mesh_c] {
        a0.enroll(p)?;
    }
    println!(
        "rig: agent RSS {} KB fresh, {} KB after enrolling 2 pods ({} ms)",
        fresh.rss_kb,
        footprint(&a0).rss_kb,
        t.elapsed().as_millis()
    );
    for p in [&tcp_s, &mesh_s] {
        a1.enroll(p)?;
    }
    let servers = [&tcp_s, &mesh_s].iter().map(|p| start_server(p)).collect::<Result<Vec<_>>>()?;
    Ok(Rig {
        tcp: (tcp_c, SocketAddr::new(tcp_s.ip4().into(), PORT)),
        hbone: (mesh_c, SocketAddr::new(mesh_s.ip4().into(), PORT)),
        _c: c,
        a0,
        a1,
        _servers: servers,
    })
}

fn per_conn(before: Footprint, during: Footprint, n: usize) -> serde_json::Value {
    json!({
        "rss_kb_per_conn": (during.rss_kb as f64 - before.rss_kb as f64) / n as f64,
        "fds_per_conn": (during.fds as f64 - before.fds as f64) / n as f64,
    })
}

/// Per mode, on fresh agents: RSS and fds per idle connection against the idle level
/// (after a little warm-up traffic), then RSS `settle` seconds after every connection closed.
fn memory(settle: u64) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for mode in ["captured-tcp", "hbone"] {
        let r = rig()?;
        let (pod, dst) = if mode == "hbone" { (&r.hbone.0, r.hbone.1) } else { (&r.tcp.0, r.tcp.1) };
        // Warm-up runs the same code paths as the measurement (a burst of more connections
        // than one HBONE connection carries, then its close), so the idle level already has
        // those code pages resident; then past the pool's surplus-idle close (10 s) and a
        // period of the agent's heap trimmer, so the idle level is settled.
        drop(hold(pod, dst, 300)?);
        std::thread::sleep(Duration::from_secs(16));
        let idle = (footprint(&r.a0), footprint(&r.a1));
        let mut sizes = serde_json::Map::new();
        for n in [1000usize, 4000] {
            let held = hold(pod, dst, n)?;
            std::thread::sleep(Duration::from_millis(500));
            let during = (footprint(&r.a0), footprint(&r.a1));
            drop(held);
            std::thread::sleep(Duration::from_secs(1));
            let row = json!({ "source_agent": per_conn(idle.0, during.0, n), "destination_agent": per_conn(idle.1, during.1, n) });
            println!("memory {mode}, {n} idle connections: {row}");
            sizes.insert(n.to_string(), row);
        }
        std::thread::sleep(Duration::from_secs(settle));
        let after = (footprint(&r.a0), footprint(&r.a1));
        println!(
            "memory {mode}: RSS idle {} / {} KB, {settle} s after all closed {} / {} KB (source / destination agent); \
             anonymous {} / {} KB -> {} / {} KB",
            idle.0.rss_kb,
            idle.1.rss_kb,
            after.0.rss_kb,
            after.1.rss_kb,
            idle.0.rss_anon_kb,
            idle.1.rss_anon_kb,
            after.0.rss_anon_kb,
            after.1.rss_anon_kb
        );
        out.insert(
            mode.into(),
            json!({ "per_connection": sizes, "rss_kb_idle": [idle.0.rss_kb, idle.1.rss_kb],
                "rss_kb_after_settle": [after.0.rss_kb, after.1.rss_kb], "settle_s": settle }),
        );
    }
    Ok(serde_json::Value::Object(out))
}

fn soak(r: &Rig, o: &Opts) -> Result<serde_json::Value> {
    let (pod, dst) = (&r.hbone.0, r.hbone.1);
    let start = (footprint(&r.a0), footprint(&r.a1));
    let mut peak = start;
    let note_peak = |p: &mut (Footprint, Footprint)| {
        let now = (footprint(&r.a0), footprint(&r.a1));
        if now.0.rss_kb > p.0.rss_kb {
            p.0 = now.0;
        }
        if now.1.rss_kb > p.1.rss_kb {
            p.1 = now.1;
        }
        now
    };
    let t = Instant::now();
    let held = hold(pod, dst, o.idle)?;
    let at_idle = note_peak(&mut peak);
    println!(
        "soak: {} idle connections held in {:.1} s: source {:?} destination {:?}",
        o.idle,
        t.elapsed().as_secs_f64(),
        at_idle.0,
        at_idle.1
    );
    drop(held);
    std::thread::sleep(Duration::from_secs(2));
    let warm = note_peak(&mut peak);

    let t = Instant::now();
    let mut opened = 0f64;
    while (opened as u64) < o.churn {
        let d = Duration::from_secs(5);
        opened += pod.run(move || blocking::connection_rate(dst, d, 8))? * d.as_secs_f64();
        note_peak(&mut peak);
    }
    println!("soak: {opened:.0} connections opened and closed in {:.0} s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let mut samples = vec![];
    while t.elapsed().as_secs_f64() < o.minutes * 60.0 {
        let d = Duration::from_secs(10);
        let lat = pod.run(move || blocking::latency(dst, 16, 1000.0, d, 1024))?;
        let tput = pod.run(move || blocking::throughput(dst, Duration::from_secs(3)))?;
        let max = pod.run(move || blocking::max_rate(dst, 16, Duration::from_secs(5)))?;
        let now = note_peak(&mut peak);
        samples.push(json!({ "t_s": t.elapsed().as_secs(), "p50_ms": lat.percentile(50.0).unwrap_or(0.0) * 1e3,
            "throughput_mbps": tput * 8.0 / 1e6, "max_qps": max.actual_qps, "source": now.0, "destination": now.1 }));
    }
    std::thread::sleep(Duration::from_secs(o.settle));
    let end = (footprint(&r.a0), footprint(&r.a1));
    let growth = |w: u64, e: u64| (e as f64 - w as f64) / w as f64 * 100.0;
    println!("soak: RSS KB start {} / {}, after warm-up {} / {}, peak {} / {}, end {} / {} (end vs warm-up {:+.1}% / {:+.1}%); fds end {} / {}; threads end {} / {}",
        start.0.rss_kb, start.1.rss_kb, warm.0.rss_kb, warm.1.rss_kb, peak.0.rss_kb, peak.1.rss_kb, end.0.rss_kb, end.1.rss_kb,
        growth(warm.0.rss_kb, end.0.rss_kb), growth(warm.1.rss_kb, end.1.rss_kb), end.0.fds, end.1.fds, end.0.threads, end.1.threads);
    Ok(json!({ "idle_connections": o.idle, "churned_connections": opened as u64, "mixed_minutes": o.minutes,
        "start": [start.0, start.1], "after_warmup": [warm.0, warm.1], "at_idle_peak": [at_idle.0, at_idle.1],
        "peak": [peak.0, peak.1], "end": [end.0, end.1], "samples": samples }))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve-echo") {
        return serve_echo(args.get(2).and_then(|p| p.parse().ok()).unwrap_or(PORT));
    }
    let o = opts();
    sweep_leftovers();
    sweep_pins();
    raise_nofile();
    let mut report = serde_json::Map::new();
    if o.only.as_deref().is_none_or(|x| x == "memory") {
        report.insert("memory".into(), memory(o.settle)?);
    }
    if o.only.as_deref().is_none_or(|x| x == "soak") {
        report.insert("soak".into(), soak(&rig()?, &o)?);
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("soak.json"), serde_json::to_string_pretty(&report)?)?;
    println!("soak: results in {}", dir.join("soak.json").display());
    Ok(())
}
