//! `cargo xtask bench`: the mesh against the no-mesh baseline, measured in the same run on
//! the same mini-cluster, alternating rounds, medians reported with ratios.
//!
//! Scenarios (pod -> pod): `no-mesh` (pods not enrolled: the physical limit, cross-node),
//! `captured-tcp` (both pods enrolled but not mesh workloads: eBPF capture -> in-pod proxy
//! -> plain TCP -> in-pod proxy -> app), `hbone` (mesh workloads: capture -> outbound ->
//! HBONE mTLS -> inbound -> app, cross-node), `hbone+sockmap` (the same with the sockmap
//! shortcut switched on for the in-pod legs), and on one node: `no-mesh-same-node`,
//! `same-node` (the in-process fast path), `same-node+sockmap` and `same-node-hbone` (an
//! agent with the fast path off, on a third node). Node agents run as separate release
//! `ztunnel node` processes so their CPU and memory are measured alone; the shortcut is
//! installed on nodes 0 and 1 and switched per scenario through the admin endpoint.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_tests::agent_process::{cluster_args, AgentProcess, Usage};
use mesh_tests::benchkit::{cpu_snapshot, measure, median, profile, start_server, CpuSnapshot, Sample, PORT};
use mesh_tests::loadgen::blocking;
use mesh_tests::loadgen::EchoServer;
use mesh_tests::mesh::{ca_dir, mesh_config_path, sweep_pins, workload_yaml};
use mesh_tests::{sweep_leftovers, Cluster, InNetns, Pod};

struct Opts {
    rounds: usize,
    secs: f64,
    /// Scenarios to run besides the baseline (all when empty).
    only: Vec<String>,
    /// Profile with `perf`: side-by-side profiles a max-rate run per row; the main bench
    /// profiles each selected mesh scenario's agents during a single bulk stream and during a
    /// max-rate run; the waypoint bench profiles the waypoint at 1000 req/s and at max rate.
    perf: bool,
}

fn opts() -> Opts {
    let mut o = Opts { rounds: 3, secs: 2.0, only: vec![], perf: false };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--perf" {
            o.perf = true;
            i += 1;
            continue;
        }
        match (args[i].as_str(), args.get(i + 1)) {
            ("--rounds", Some(v)) => o.rounds = v.parse().unwrap_or(o.rounds),
            ("--secs", Some(v)) => o.secs = v.parse().unwrap_or(o.secs),
            ("--only", Some(v)) => o.only = v.split(',').map(str::to_string).collect(),
            _ => {}
        }
        i += 2;
    }
    o
}

fn main() -> Result<()> {
    let o = opts();
    sweep_leftovers();
    sweep_pins();
    let binary = std::env::current_exe()?.with_file_name("ztunnel");
    anyhow::ensure!(
        binary.exists(),
        "{} missing: run `cargo build --release -p ztunnel` (cargo xtask bench does)",
        binary.display()
    );
    if o.only.iter().any(|x| x == "xds-scale") {
        return mesh_tests::xds_scale::run(&binary).map(drop);
    }
    if o.only.iter().any(|x| x == "waypoint") {
        return mesh_tests::waypoint_bench::run(&binary, o.rounds, o.secs, o.perf);
    }
    if o.only.iter().any(|x| x == "side-by-side") {
        return mesh_tests::side_by_side::run(&binary, o.rounds, o.secs, o.perf);
    }

    let mut c = Cluster::new(3).context("mini-cluster (needs root)")?;
    let plain_c = c.add_pod(0, "plainc")?;
    let plain_s = c.add_pod(1, "plains")?;
    let plain_local = c.add_pod(0, "plainl")?;
    let tls_c = c.add_pod(2, "tlsc")?;
    let tls_local = c.add_pod(2, "tlsl")?;
    let tcp_c = c.add_pod(0, "tcpc")?;
    let tcp_s = c.add_pod(1, "tcps")?;
    let mesh_c = c.add_pod(0, "meshc")?;
    let mesh_s = c.add_pod(1, "meshs")?;
    let mesh_local = c.add_pod(0, "meshl")?;
    let mesh_pods = [&mesh_c, &mesh_s, &mesh_local, &tls_c, &tls_local];
    let yaml = format!(
        "workloads:\n{}",
        mesh_pods.iter().map(|p| workload_yaml(p, "default", p.name(), "")).collect::<String>()
    );
    let extra = cluster_args(&c, Some(&yaml), &[])?;
    let with = |more: &[&str]| extra.iter().cloned().chain(more.iter().map(|s| s.to_string())).collect::<Vec<_>>();
    let shortcut = with(&["--sockmap-shortcut", "true", "--same-node-fast-path", "true"]);
    let a0 = AgentProcess::start(&binary, &c, 0, &shortcut)?;
    let a1 = AgentProcess::start(&binary, &c, 1, &shortcut)?;
    let a2 = AgentProcess::start(&binary, &c, 2, &with(&["--same-node-fast-path", "false"]))?;
    std::thread::sleep(Duration::from_millis(500));
    let idle: Vec<Usage> = vec![a0.usage()?, a1.usage()?];
    for p in [&tcp_c, &mesh_c, &mesh_local] {
        a0.enroll(p)?;
    }
    for p in [&tcp_s, &mesh_s] {
        a1.enroll(p)?;
    }
    for p in [&tls_c, &tls_local] {
        a2.enroll(p)?;
    }
    let _servers: Vec<EchoServer> = [&plain_s, &plain_local, &tcp_s, &mesh_s, &mesh_local, &tls_local]
        .iter()
        .map(|p| start_server(p))
        .collect::<Result<_>>()?;

    let at = |p: &Pod| SocketAddr::new(p.ip4().into(), PORT);
    // Name, client, server, the agents carrying it, the sockmap shortcut on for it.
    type Scenario<'a> = (&'a str, &'a Pod, SocketAddr, Vec<&'a AgentProcess>, bool);
    let scenarios: Vec<Scenario> = vec![
        ("no-mesh", &plain_c, at(&plain_s), vec![], false),
        ("captured-tcp", &tcp_c, at(&tcp_s), vec![&a0, &a1], false),
        ("hbone", &mesh_c, at(&mesh_s), vec![&a0, &a1], false),
        ("hbone+sockmap", &mesh_c, at(&mesh_s), vec![&a0, &a1], true),
        ("no-mesh-same-node", &plain_c, at(&plain_local), vec![], false),
        ("same-node", &mesh_c, at(&mesh_local), vec![&a0], false),
        ("same-node+sockmap", &mesh_c, at(&mesh_local), vec![&a0], true),
        ("same-node-hbone", &tls_c, at(&tls_local), vec![&a2], false),
    ];
    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    for round in 0..o.rounds {
        for (name, client, dst, agents, sockmap) in &scenarios {
            if !name.starts_with("no-mesh") && !o.only.is_empty() && !o.only.iter().any(|x| x == name) {
                continue;
            }
            for a in [&a0, &a1] {
                a.set_shortcut(*sockmap)?;
            }
            let pids: Vec<u32> = agents.iter().map(|a| a.pid()).collect();
            let cpu = || cpu_snapshot(&pids);
            let cpu: Option<&dyn Fn() -> CpuSnapshot> = if agents.is_empty() { None } else { Some(&cpu) };
            let s = measure(client, *dst, o.secs, cpu).with_context(|| format!("{name} round {round}"))?;
            eprintln!("round {round} {name:<14} {s:?}");
            samples.entry(name).or_default().push(s);
        }
    }
    let loaded: Vec<Usage> = vec![a0.usage()?, a1.usage()?];
    let out = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into())).join("bench");
    if o.perf {
        for (name, client, dst, agents, sockmap) in &scenarios {
            if agents.is_empty() || !samples.contains_key(name) {
                continue;
            }
            for a in [&a0, &a1] {
                a.set_shortcut(*sockmap)?;
            }
            let pids: Vec<u32> = agents.iter().map(|a| a.pid()).collect();
            let dst = *dst;
            let four = Duration::from_secs(4);
            profile(&format!("{name}-bulk"), &pids, &out, || {
                let bps = client.run(move || blocking::throughput(dst, four)).context("throughput under perf")?;
                Ok(format!("one bulk stream {:.0} Mbit/s", bps * 8.0 / 1e6))
            })?;
            profile(&format!("{name}-rate"), &pids, &out, || {
                let r = client.run(move || blocking::max_rate(dst, 16, four)).context("max rate under perf")?;
                Ok(format!("max rate {:.0} req/s over 16 connections", r.actual_qps))
            })?;
            profile(&format!("{name}-conns"), &pids, &out, || {
                let r =
                    client.run(move || blocking::connection_rate(dst, four, 8)).context("connections under perf")?;
                Ok(format!("{r:.0} new connections/s over 8 at a time"))
            })?;
        }
    }
    for a in [&a0, &a1] {
        let (_, report) = a.admin("GET", "/shortcut")?;
        eprintln!("sockmap shortcut: {}", report.trim());
    }

    let med = |name: &str, f: fn(&Sample) -> f64| median(samples[name].iter().map(f).collect());
    type Metric = (&'static str, fn(&Sample) -> f64, bool);
    let metrics: [Metric; 8] = [
        ("throughput Mbit/s (1 stream)", |s| s.throughput_mbps, true),
        ("p50 ms (c16, 1000 qps, 1 KiB)", |s| s.p50_ms, false),
        ("p90 ms", |s| s.p90_ms, false),
        ("p99 ms", |s| s.p99_ms, false),
        ("max keep-alive req/s (c16)", |s| s.max_qps, true),
        ("max keep-alive req/s (c64)", |s| s.max_qps_c64, true),
        ("new connections/s (c8)", |s| s.conns_per_sec, true),
        ("HTTP churn req/s (close, c8)", |s| s.churn_per_sec, true),
    ];
    let names: Vec<&str> = scenarios.iter().map(|s| s.0).filter(|n| samples.contains_key(n)).collect();
    print!("\n{:<30} {:>11}", "metric (median; ratio to no-mesh)", "no-mesh");
    for n in &names[1..] {
        print!(" {n:>24}");
    }
    println!();
    let mut report = serde_json::Map::new();
    for (label, f, _higher_better) in metrics {
        let base = med("no-mesh", f);
        print!("{label:<30} {base:>11.3}");
        let mut row = serde_json::Map::new();
        row.insert("no-mesh".into(), base.into());
        for n in &names[1..] {
            let v = med(n, f);
            print!(" {:>14.3} ({:>6.3}x)", v, v / base);
            row.insert((*n).into(), serde_json::json!({"value": v, "ratio": v / base}));
        }
        println!();
        report.insert(label.into(), row.into());
    }
    for (label, f) in [
        ("agent CPU s / 1000 req", (|s: &Sample| s.cpu_s_per_1k) as fn(&Sample) -> f64),
        ("agent CPU s / GB", |s: &Sample| s.cpu_s_per_gb),
        ("agent cores at 1000 req/s", |s: &Sample| s.cores_at_1000qps),
        ("  the same, fortio -jitter", |s: &Sample| s.cores_at_1000qps_jitter),
    ] {
        print!("{label:<30} {:>11}", "-");
        let mut row = serde_json::Map::new();
        for n in &names[1..] {
            let v = med(n, f);
            print!(" {v:>24.4}");
            row.insert((*n).into(), v.into());
        }
        println!();
        report.insert(label.into(), row.into());
    }
    // Same-node scenarios against the same-node baseline (the table's ratios are to the
    // cross-node one).
    if samples.contains_key("no-mesh-same-node") {
        for n in ["same-node", "same-node+sockmap", "same-node-hbone"] {
            if !samples.contains_key(n) {
                continue;
            }
            let (tp, p50, qps) = (
                med(n, |s| s.throughput_mbps) / med("no-mesh-same-node", |s| s.throughput_mbps),
                med(n, |s| s.p50_ms) / med("no-mesh-same-node", |s| s.p50_ms),
                med(n, |s| s.max_qps) / med("no-mesh-same-node", |s| s.max_qps),
            );
            println!("{n:<30} vs no-mesh-same-node: throughput {tp:.3}x, p50 {p50:.3}x, max req/s {qps:.3}x");
            report.insert(
                format!("{n} vs no-mesh-same-node"),
                serde_json::json!({"throughput": tp, "p50": p50, "max_qps": qps}),
            );
        }
    }
    let rss = |u: &[Usage]| u.iter().map(|x| x.rss_bytes as f64 / 1e6).fold(0.0, f64::max);
    println!("{:<30} {:>11} {:>24.1}", "agent RSS MB idle (max of 2)", "-", rss(&idle));
    println!("{:<30} {:>11} {:>24.1}", "agent RSS MB after load", "-", rss(&loaded));
    report.insert("rss_mb_idle".into(), rss(&idle).into());
    report.insert("rss_mb_loaded".into(), rss(&loaded).into());
    report.insert("rounds".into(), serde_json::to_value(&samples)?);

    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("capture.json"), serde_json::to_vec_pretty(&report)?)?;
    println!("\nfull results: {}", out.join("capture.json").display());
    a0.stop_and_uninstall()?;
    a1.stop_and_uninstall()?;
    a2.stop_and_uninstall()?;
    let _ = std::fs::remove_file(mesh_config_path(&c));
    let _ = std::fs::remove_dir_all(ca_dir(&c));
    Ok(())
}
