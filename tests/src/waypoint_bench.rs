//! `cargo xtask bench --only waypoint`: the waypoint hop measured beside direct HBONE and
//! no mesh, in the same run, alternating rounds. HTTP/1.1 keep-alive with 1 KiB bodies
//! over 16 connections, at 1000 requests/s (latency, and the waypoint's CPU at that rate
//! under four arrival schedules) and as fast as possible (max rate, and CPU per 1000
//! requests). The same waypoint relaying a service with only a `tcp` rule is measured the
//! same way: the cost of carrying a request through two HBONE legs without reading it,
//! which the HTTP path's cost sits on. Node agents and the waypoint are separate release
//! processes, so their CPU and memory are read alone.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::agent_process::{cluster_args, AgentProcess};
use crate::benchkit::{cpu_snapshot, median, paced_cores, process_usage, start_server, PORT};
use crate::loadgen::EchoServer;
use crate::loadgen::{blocking, FortioResult, LoadSpec, Pacing, Protocol};
use crate::mesh::workload_yaml;
use crate::waypoint::{service, WaypointProcess};
use crate::{Cluster, InNetns, Pod};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
/// The same server again as `httpbin`, under Istio's circuit-breaking task's DestinationRule.
const BREAKER_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 41);
/// The same server again as `web-tcp`, whose VirtualService has only a `tcp` rule: the
/// waypoint relays its tunnels whole, the floor under the HTTP path's cost.
const TCP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 42);
const BREAKER: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: httpbin}\nspec:\n  host: httpbin\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 1}\n      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}\n";

/// A figure of a round by its name.
type Row = (&'static str, fn(&WaypointSample) -> f64);

/// A proxy scenario's CPU figures, by the suffix of their keys in `waypoint.json`.
const CPU_FIELDS: [Row; 5] = [
    ("cores_at_1000_rps", |s| s.waypoint_cores_at_1000),
    ("cores_at_1000_rps_poisson", |s| s.waypoint_cores_at_1000_poisson),
    ("cores_at_1000_rps_uniform", |s| s.waypoint_cores_at_1000_uniform),
    ("cores_at_1000_rps_aligned", |s| s.waypoint_cores_at_1000_aligned),
    ("cpu_s_per_1k_max_rate", |s| s.waypoint_cpu_s_per_1k),
];

/// One round of one scenario.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct WaypointSample {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_qps: f64,
    /// Waypoint CPU cores at 1000 requests/s, fortio `-jitter` (Istio's CPU runs).
    pub waypoint_cores_at_1000: f64,
    /// The same with Poisson arrivals.
    pub waypoint_cores_at_1000_poisson: f64,
    /// The same with fortio `-uniform`: every request arrives alone.
    pub waypoint_cores_at_1000_uniform: f64,
    /// The same with fortio's default schedule (no flag, the literal `-c 16 -qps
    /// 1000`): each interval's 16 requests leave together.
    pub waypoint_cores_at_1000_aligned: f64,
    /// Waypoint CPU seconds per 1000 requests at max rate.
    pub waypoint_cpu_s_per_1k: f64,
}

fn http(dst: SocketAddr, qps: Option<f64>, secs: f64) -> LoadSpec {
    let mut spec = LoadSpec::new(dst, Duration::from_secs_f64(secs));
    spec.protocol = Protocol::Http;
    spec.qps = qps;
    spec
}

/// Latency at 1000 req/s (fortio `-uniform`, so no request queues behind another), max
/// rate, and, for a scenario with a proxy process, that process's CPU at 1000 req/s under
/// each arrival schedule: a proxy's CPU per request depends on how often it wakes, and so
/// on whether requests arrive together or alone. The paced runs take turns going first
/// (`round`), so none always inherits the tail of the same predecessor.
fn measure(client: &Pod, dst: SocketAddr, secs: f64, waypoint: Option<u32>, round: usize) -> Result<WaypointSample> {
    let pids: Vec<u32> = waypoint.into_iter().collect();
    let cpu = || cpu_snapshot(&pids);
    let paced = |pacing: Pacing| -> Result<(FortioResult, f64)> {
        let mut spec = http(dst, Some(1000.0), secs);
        spec.pacing = pacing;
        paced_cores(client, spec, &cpu)
    };
    let mut schedules = vec![Pacing::Uniform];
    if waypoint.is_some() {
        schedules.extend([Pacing::Jitter, Pacing::Poisson, Pacing::Aligned]);
    }
    let turn = round % schedules.len();
    schedules.rotate_left(turn);
    let mut out = WaypointSample::default();
    let mut lat = None;
    for pacing in schedules {
        let (r, cores) = paced(pacing)?;
        match pacing {
            Pacing::Uniform => {
                out.waypoint_cores_at_1000_uniform = cores;
                lat = Some(r);
            }
            Pacing::Jitter => out.waypoint_cores_at_1000 = cores,
            Pacing::Aligned => out.waypoint_cores_at_1000_aligned = cores,
            Pacing::Poisson => out.waypoint_cores_at_1000_poisson = cores,
        }
    }
    let lat = lat.context("no latency run")?;
    let spec = http(dst, None, secs);
    let c1 = cpu();
    let max = client.run(move || blocking::run_load(&spec)).context("max rate")?;
    let max_cpu = cpu().since(&c1);
    anyhow::ensure!(max.errors() == 0, "{dst}: errors in the max-rate run");
    let ms = |p: f64| lat.percentile(p).unwrap_or(f64::NAN) * 1000.0;
    let reqs = max.duration_histogram.count as f64;
    out.p50_ms = ms(50.0);
    out.p99_ms = ms(99.0);
    out.max_qps = max.actual_qps;
    out.waypoint_cpu_s_per_1k = if reqs > 0.0 && waypoint.is_some() { max_cpu / reqs * 1000.0 } else { 0.0 };
    Ok(out)
}

/// Runs the comparison and prints (and writes `target/bench/waypoint.json`); with `perf`,
/// then profiles the waypoint at 1000 requests/s and at max rate.
pub fn run(binary: &Path, rounds: usize, secs: f64, perf: bool) -> Result<()> {
    let mut c = Cluster::new(2).context("mini-cluster (needs root)")?;
    let plain_c = c.add_pod(0, "plainc")?;
    let plain_s = c.add_pod(1, "plains")?;
    let client = c.add_pod(0, "client")?;
    let server = c.add_pod(1, "server")?;
    let wp = c.add_pod(0, "waypoint")?;
    let gw = c.add_pod(0, "ingress")?;
    let big = c.add_pod(0, "wp-big")?;
    let svc = format!(
        "  services:\n    default/web.default.svc.cluster.local:\n      {PORT}: {PORT}\n    default/httpbin.default.svc.cluster.local:\n      {PORT}: {PORT}\n    default/web-tcp.default.svc.cluster.local:\n      {PORT}: {PORT}\n"
    );
    let yaml = format!(
        "workloads:\n{}{}{}services:\n{}{}{}",
        workload_yaml(&client, "default", "client", ""),
        workload_yaml(&server, "default", "server", &svc),
        crate::waypoint::waypoint_workload(&wp),
        service("web", VIP, PORT, Some(&wp)),
        service("httpbin", BREAKER_VIP, PORT, Some(&wp)),
        service("web-tcp", TCP_VIP, PORT, Some(&wp)),
    );
    let extra = cluster_args(&c, Some(&yaml), &[])?;
    let a0 = AgentProcess::start(binary, &c, 0, &extra)?;
    let a1 = AgentProcess::start(binary, &c, 1, &extra)?;
    a0.enroll(&client)?;
    a1.enroll(&server)?;
    let _servers: Vec<EchoServer> = [&plain_s, &server].iter().map(|p| start_server(p)).collect::<Result<_>>()?;
    let routes = PathBuf::from(crate::mesh::RUN_DIR).join(format!("{}-routes", c.prefix()));
    std::fs::create_dir_all(&routes)?;
    std::fs::write(
        routes.join("web.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  http:\n  - route:\n    - destination: {host: web}\n",
    )?;
    std::fs::write(routes.join("httpbin.yaml"), BREAKER)?;
    std::fs::write(
        routes.join("web-tcp.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web-tcp}\nspec:\n  hosts: [web-tcp]\n  tcp:\n  - route:\n    - destination: {host: web}\n",
    )?;
    let waypoint = WaypointProcess::start(&c, &wp, &routes)?;
    // The ingress gateway in front of the same service: a Gateway on 8080 for every host.
    let ingress_routes = PathBuf::from(crate::mesh::RUN_DIR).join(format!("{}-ingress", c.prefix()));
    std::fs::create_dir_all(&ingress_routes)?;
    std::fs::write(
        ingress_routes.join("gateway.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: web}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 8080, name: http, protocol: HTTP}\n    hosts: ['*']\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web-ingress}\nspec:\n  hosts: ['*']\n  gateways: [web]\n  http:\n  - route:\n    - destination: {host: web}\n",
    )?;
    let gateway = WaypointProcess::start_gateway(&c, &gw, &ingress_routes, &[])?;
    std::thread::sleep(Duration::from_millis(500));
    let idle_rss = process_usage(waypoint.pid())?.rss_bytes as f64 / 1e6;
    let (scale_rss, small_rss) = memory_at_scale(&c, &big, 1000)?;

    let scenarios: [(&str, &Pod, SocketAddr, Option<u32>); 5] = [
        ("no-mesh", &plain_c, SocketAddr::new(plain_s.ip4().into(), PORT), None),
        ("hbone", &client, SocketAddr::new(server.ip4().into(), PORT), None),
        ("waypoint", &client, SocketAddr::from((VIP, PORT)), Some(waypoint.pid())),
        ("wp-tcp", &client, SocketAddr::from((TCP_VIP, PORT)), Some(waypoint.pid())),
        // From outside the mesh (a pod nobody enrolled) through the ingress gateway.
        ("ingress", &plain_c, SocketAddr::new(gw.ip4().into(), 8080), Some(gateway.pid())),
    ];
    let mut samples: BTreeMap<&str, Vec<WaypointSample>> = BTreeMap::new();
    for round in 0..rounds {
        for (name, from, dst, pid) in &scenarios {
            let s = measure(from, *dst, secs, *pid, round).with_context(|| format!("{name} round {round}"))?;
            eprintln!("round {round} {name:<9} {s:?}");
            samples.entry(name).or_default().push(s);
        }
    }
    let loaded_rss = process_usage(waypoint.pid())?.rss_bytes as f64 / 1e6;
    let breaking = circuit_breaking(&client, secs)?;
    let med = |n: &str, f: fn(&WaypointSample) -> f64| median(samples[n].iter().map(f).collect());
    println!(
        "\n{:<38} {:>10} {:>10} {:>10} {:>10}",
        "HTTP/1.1 keep-alive, 1 KiB, c16 (median)", "no-mesh", "hbone", "waypoint", "ingress"
    );
    let rows: [Row; 3] =
        [("p50 ms at 1000 qps", |s| s.p50_ms), ("p99 ms at 1000 qps", |s| s.p99_ms), ("max req/s", |s| s.max_qps)];
    let mut report = serde_json::Map::new();
    for (label, f) in rows {
        let v: Vec<f64> = ["no-mesh", "hbone", "waypoint", "ingress"].iter().map(|n| med(n, f)).collect();
        println!("{label:<38} {:>10.3} {:>10.3} {:>10.3} {:>10.3}", v[0], v[1], v[2], v[3]);
        report.insert(
            label.into(),
            serde_json::json!({"no-mesh": v[0], "hbone": v[1], "waypoint": v[2], "ingress": v[3]}),
        );
    }
    let added_p99 = med("waypoint", |s| s.p99_ms) - med("hbone", |s| s.p99_ms);
    let [cores, poisson, uniform, aligned, per_1k] = CPU_FIELDS.map(|(_, f)| med("waypoint", f));
    println!("p99 added by the waypoint hop          {added_p99:.3} ms (target < 1 ms)");
    println!(
        "waypoint CPU at 1000 req/s             {cores:.3} cores, fortio -jitter (target < 0.1; Envoy about 0.25)"
    );
    println!("  the same, Poisson arrivals           {poisson:.3} cores");
    println!("  the same, each request alone         {uniform:.3} cores (fortio -uniform)");
    println!("  the same, each round's 16 together   {aligned:.3} cores (fortio's default schedule)");
    println!("waypoint CPU per 1000 req at max rate  {per_1k:.3} core-seconds");
    let [tcp_jitter, tcp_poisson, tcp_uniform, tcp_aligned, tcp_per_1k] = CPU_FIELDS.map(|(_, f)| med("wp-tcp", f));
    println!(
        "  as a TCP relay (a tcp rule)          {tcp_jitter:.3} cores -jitter, {tcp_poisson:.3} Poisson, {tcp_uniform:.3} -uniform, {tcp_aligned:.3} default; {tcp_per_1k:.3} core-s per 1000 at max rate"
    );
    println!(
        "waypoint RSS                           {idle_rss:.1} MB idle, {loaded_rss:.1} MB after load (target < 30)"
    );
    println!(
        "waypoint RSS, 1000 routes + 1000 endpoints {scale_rss:.1} MB (same binary with 1 route + 1 endpoint: {small_rss:.1} MB)"
    );
    report.insert("added_p99_ms".into(), added_p99.into());
    report.insert("waypoint_rss_mb_1000_routes_1000_endpoints".into(), scale_rss.into());
    report.insert("waypoint_rss_mb_1_route_1_endpoint".into(), small_rss.into());
    report.insert("ingress_cpu_s_per_1k_max_rate".into(), med("ingress", |s| s.waypoint_cpu_s_per_1k).into());
    for (scenario, prefix) in [("waypoint", "waypoint"), ("wp-tcp", "tcp_relay")] {
        for (suffix, f) in CPU_FIELDS {
            report.insert(format!("{prefix}_{suffix}"), med(scenario, f).into());
        }
    }
    report.insert("waypoint_rss_mb_idle".into(), idle_rss.into());
    report.insert("waypoint_rss_mb_loaded".into(), loaded_rss.into());
    println!(
        "\ncircuit breaking, Istio's task (maxConnections 1, http1MaxPendingRequests 1, maxRequestsPerConnection 1):"
    );
    for (c, r) in &breaking {
        let total: u64 = r.ret_codes.values().sum();
        let codes: Vec<String> = r
            .ret_codes
            .iter()
            .map(|(code, n)| format!("Code {code} : {n} ({:.1} %)", 100.0 * *n as f64 / total.max(1) as f64))
            .collect();
        println!("  -c {c}: {total:>6} requests   {}", codes.join("   "));
    }
    report.insert(
        "circuit_breaking".into(),
        breaking
            .iter()
            .map(|(c, r)| Ok((format!("c{c}"), serde_json::to_value(&r.ret_codes)?)))
            .collect::<Result<serde_json::Map<_, _>>>()?
            .into(),
    );
    report.insert("rounds".into(), serde_json::to_value(&samples)?);
    let out = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into())).join("bench");
    std::fs::create_dir_all(&out)?;
    if perf {
        let (vip, tcp_vip) = (SocketAddr::from((VIP, PORT)), SocketAddr::from((TCP_VIP, PORT)));
        let rows = [
            ("waypoint-1000rps", vip, Some(1000.0)),
            ("waypoint-max-rate", vip, None),
            ("waypoint-tcp-1000rps", tcp_vip, Some(1000.0)),
            ("waypoint-tcp-max-rate", tcp_vip, None),
        ];
        for (row, vip, qps) in rows {
            crate::benchkit::profile(row, &[waypoint.pid()], &out, || {
                let spec = http(vip, qps, 4.0);
                let r = client.run(move || blocking::run_load(&spec)).context("load under perf")?;
                Ok(format!("{:.0} req/s over 16 connections", r.actual_qps))
            })?;
        }
    }
    std::fs::write(out.join("waypoint.json"), serde_json::to_vec_pretty(&report)?)?;
    println!("\nfull results: {}", out.join("waypoint.json").display());
    drop(waypoint);
    drop(gateway);
    let _ = std::fs::remove_dir_all(ingress_routes);
    a0.stop_and_uninstall()?;
    a1.stop_and_uninstall()?;
    let _ = std::fs::remove_dir_all(routes);
    Ok(())
}

/// Istio's circuit-breaking task: the load generator at `-c 2`, then `-c 3`, as fast as it
/// can, through the waypoint to `httpbin` under [`BREAKER`]: each run's result codes.
fn circuit_breaking(client: &Pod, secs: f64) -> Result<Vec<(usize, crate::loadgen::FortioResult)>> {
    [2, 3]
        .into_iter()
        .map(|c| {
            let mut spec = http(SocketAddr::from((BREAKER_VIP, PORT)), None, secs);
            spec.connections = c;
            let r =
                client.run(move || blocking::run_load(&spec)).with_context(|| format!("circuit breaking -c {c}"))?;
            Ok((c, r))
        })
        .collect()
}

/// RSS of a waypoint holding `n` VirtualServices (each a header match and a route) for `n`
/// services with one endpoint each, after it loaded them, and of the same process with one
/// of each: (MB at scale, MB small). Its own local config, not the cluster's.
fn memory_at_scale(c: &Cluster, pod: &Pod, n: usize) -> Result<(f64, f64)> {
    let mut out = Vec::new();
    for count in [n, 1] {
        let dir = PathBuf::from(crate::mesh::RUN_DIR).join(format!("{}-scale-{count}", c.prefix()));
        let routes = dir.join("routes");
        std::fs::create_dir_all(&routes)?;
        let (mut workloads, mut services, mut vs) = (String::new(), String::new(), String::new());
        for i in 0..count {
            let (a, b) = (i / 250, i % 250 + 1);
            workloads += &format!(
                "- uid: scale-{i}\n  name: app-{i}\n  namespace: default\n  serviceAccount: app-{i}\n  workloadIps: [\"10.200.{a}.{b}\"]\n  protocol: HBONE\n  services:\n    default/svc-{i}.default.svc.cluster.local:\n      8080: 8080\n"
            );
            services += &format!(
                "- name: svc-{i}\n  namespace: default\n  hostname: svc-{i}.default.svc.cluster.local\n  vips: [\"10.100.{a}.{b}\"]\n  ports:\n    8080: 8080\n"
            );
            vs += &format!(
                "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: svc-{i}}}\nspec:\n  hosts: [svc-{i}]\n  http:\n  - match:\n    - headers:\n        end-user: {{exact: user-{i}}}\n    route:\n    - destination: {{host: svc-{i}}}\n  - route:\n    - destination: {{host: svc-{i}}}\n"
            );
        }
        let config = dir.join("mesh.yaml");
        std::fs::write(&config, format!("workloads:\n{workloads}services:\n{services}"))?;
        std::fs::write(routes.join("routes.yaml"), vs)?;
        let args = vec![
            "--local-config".to_string(),
            config.display().to_string(),
            "--ca-state-dir".into(),
            crate::mesh::ca_dir(c).display().to_string(),
        ];
        let wp = WaypointProcess::spawn(pod, &routes, &args)?;
        std::thread::sleep(Duration::from_millis(1500));
        out.push(process_usage(wp.pid())?.rss_bytes as f64 / 1e6);
        drop(wp);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok((out[0], out[1]))
}
