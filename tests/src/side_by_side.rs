//! Our agent against Istio's own ztunnel, in one run (issue 9; `cargo xtask bench --only
//! side-by-side`). Four rows, each a client pod → echo server pod, cross-node and same-node,
//! with the same load generator and the same apps, rounds alternating between rows:
//! - `no-mesh`: pods in no mesh (the baseline every ratio is against);
//! - `istio-iptables`: Istio's ztunnel (shared mode, one per node, enrolled over ZDS by our
//!   `ztunnel cni`) behind istio-cni's in-pod iptables rules (the anchor);
//! - `istio-ebpf`: the same Istio processes, for pods captured by our eBPF programs instead
//!   (the same code `ztunnel cni --ebpf-capture` runs), no iptables;
//! - `ours-ebpf`: our agent (`ztunnel node`, one release process per node) on our capture.
//!
//! The two Istio rows share Istio's processes, so the proxy is held fixed and only the
//! capture differs. Proxy CPU is read from `/proc` for the processes carrying the row's
//! traffic (both nodes cross-node, node 0 same-node). Results go to
//! `target/bench/side-by-side.json` and a chart to `target/bench/side-by-side.svg`.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::agent_process::{cluster_args, AgentProcess};
use crate::benchkit::{
    cpu_snapshot, measure, median, process_usage, start_server, svg_bar_chart, svg_document, BarGroup, CpuSnapshot,
    Sample, PORT,
};
use crate::cgroup::create_cgroup;
use crate::cni::CniNode;
use crate::control_plane::ControlPlane;
use crate::istio::{install_istio_cni_rules, local_config, peer_binary, IstioZtunnel};
use crate::mesh::{ca_dir, ensure_bpffs, mesh_config_path, sweep_pins, workload_yaml, BPFFS};
use crate::{Cluster, InNetns, Pod};

/// The rows, in table order.
const ROWS: [&str; 4] = ["no-mesh", "istio-iptables", "istio-ebpf", "ours-ebpf"];

/// A row's pods: client and local server on node 0, remote server on node 1.
struct RowPods {
    client: Pod,
    remote: Pod,
    local: Pod,
}

/// Runs the comparison; prints one line and returns when Istio's ztunnel is not available.
/// With `perf`, each mesh row's proxies are then profiled during a cross-node max-rate run.
pub fn run(ours_binary: &Path, rounds: usize, secs: f64, perf: bool) -> Result<()> {
    let Some(istio_binary) = peer_binary() else {
        println!(
            "side-by-side bench did NOT run: Istio's ztunnel not found ($ISTIO_ZTUNNEL or ../shared/peers/ztunnel)"
        );
        return Ok(());
    };
    sweep_pins();
    ensure_bpffs()?;
    let mut c = Cluster::new(2).context("mini-cluster (needs root)")?;
    let mut pods: BTreeMap<&str, RowPods> = BTreeMap::new();
    for (row, short) in ROWS.iter().zip(["plain", "ipt", "ebpf", "ours"]) {
        let client = c.add_pod(0, &format!("{short}c"))?;
        let remote = c.add_pod(1, &format!("{short}s"))?;
        let local = c.add_pod(0, &format!("{short}l"))?;
        pods.insert(row, RowPods { client, remote, local });
    }
    let p = |row: &str| &pods[row];

    // Our agents, with our rows' pods as their workloads.
    let ours = p("ours-ebpf");
    let yaml = format!(
        "workloads:\n{}{}{}",
        workload_yaml(&ours.client, "default", ours.client.name(), ""),
        workload_yaml(&ours.remote, "default", ours.remote.name(), ""),
        workload_yaml(&ours.local, "default", ours.local.name(), ""),
    );
    // Our agents with the same-node fast path on (off by default; see docs/decisions.md).
    let extra = cluster_args(&c, Some(&yaml), &["--same-node-fast-path", "true"])?;
    let a0 = AgentProcess::start(ours_binary, &c, 0, &extra)?;
    let a1 = AgentProcess::start(ours_binary, &c, 1, &extra)?;

    // Istio's ztunnel on each node, enrolled by our CNI, which learns the ambient pods from
    // our controller; the eBPF row's capture registered with Istio's cgroups as the proxy.
    let istio_pods: Vec<&Pod> =
        ["istio-iptables", "istio-ebpf"].iter().flat_map(|r| [&p(r).client, &p(r).remote, &p(r).local]).collect();
    let node_of = |pod: &Pod| if pod.name().ends_with('s') { 1 } else { 0 };
    let placed: Vec<(&Pod, usize)> = istio_pods.iter().map(|q| (*q, node_of(q))).collect();
    let cp = ControlPlane::start_ambient(&c, &placed);
    let cnis = [CniNode::start(&c, 0, &cp.access)?, CniNode::start(&c, 1, &cp.access)?];
    let cgroups: Vec<PathBuf> = (0..2).map(|n| c.cgroup_path().join(format!("istio-node{n}"))).collect();
    for cg in &cgroups {
        create_cgroup(cg)?;
    }
    let capture = ztunnel::redirect::Capture::install(ztunnel::redirect::CaptureConfig {
        pin_dir: PathBuf::from(BPFFS).join(format!("{}-sbs-capture", c.prefix())),
        cgroup: crate::cgroup2_root()?.to_path_buf(),
        exclusions: Default::default(),
        max_pods: 64,
        for_foreign_proxy: true,
        sockmap_shortcut: false,
        shortcut_max_sockets: ztunnel::redirect::DEFAULT_SHORTCUT_MAX_SOCKETS,
    })?;
    for cg in &cgroups {
        capture.add_proxy_cgroup(cg)?;
    }
    let config = local_config(&istio_pods);
    let istio: Vec<IstioZtunnel> = (0..2)
        .map(|n| {
            IstioZtunnel::start_shared_with(
                &istio_binary,
                c.node(n),
                Some(&cgroups[n]),
                cnis[n].zds_socket(),
                &config,
                &format!("{}-sbs-istio{n}", c.prefix()),
                &[],
            )
        })
        .collect::<Result<_>>()?;
    for cni in &cnis {
        cni.wait(Duration::from_secs(10), |s| s.synced && s.agents == 1)?;
    }
    let add = |pod: &Pod| -> Result<()> {
        let run = cnis[node_of(pod)].plugin("ADD", pod);
        if run.code != Some(0) {
            bail!("plugin ADD of {}: {run:?}", pod.name());
        }
        Ok(())
    };
    for q in [&p("istio-iptables").client, &p("istio-iptables").remote, &p("istio-iptables").local] {
        install_istio_cni_rules(q)?;
        add(q)?;
    }
    // Istio's processes carry both Istio rows' pods (six); ours carry three. Its RSS with
    // the first row's three pods is the like-for-like idle figure.
    std::thread::sleep(Duration::from_millis(500));
    // Each mesh row's proxy processes, node 0 then node 1 (ours below).
    let istio_pids = [istio[0].pid(), istio[1].pid()];
    let istio_three_pods = rss_by_proxy(&istio_pids, &[])?["istio"];
    for q in [&p("istio-ebpf").client, &p("istio-ebpf").remote, &p("istio-ebpf").local] {
        let netns = ztunnel::netns::InpodNetns::new(q.netns_file().try_clone()?)?;
        capture.enroll_for_proxy(q.uid(), &netns)?;
        add(q)?;
    }
    a0.enroll(&ours.client)?;
    a0.enroll(&ours.local)?;
    a1.enroll(&ours.remote)?;
    let _servers: Vec<_> =
        pods.values().flat_map(|r| [&r.remote, &r.local]).map(start_server).collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_millis(500));
    let ours_pids = [a0.pid(), a1.pid()];
    let proxies = |row: &str| if row == "ours-ebpf" { ours_pids } else { istio_pids };
    let mut idle = rss_by_proxy(&istio_pids, &ours_pids)?;
    idle.insert("istio_three_pods", istio_three_pods);

    let mut samples: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for round in 0..rounds {
        for placement in ["cross-node", "same-node"] {
            let nodes = if placement == "cross-node" { 2 } else { 1 };
            for row in ROWS {
                let r = p(row);
                let server = if placement == "cross-node" { &r.remote } else { &r.local };
                let dst = SocketAddr::new(server.ip4().into(), PORT);
                let pids = proxies(row);
                let cpu = || cpu_snapshot(&pids[..nodes]);
                let cpu: Option<&dyn Fn() -> CpuSnapshot> = if row == "no-mesh" { None } else { Some(&cpu) };
                let s =
                    measure(&r.client, dst, secs, cpu).with_context(|| format!("{row} {placement} round {round}"))?;
                eprintln!("round {round} {placement:<10} {row:<15} {s:?}");
                samples.entry(format!("{placement}/{row}")).or_default().push(s);
            }
        }
        if round == 0 {
            verify_paths(&istio, &capture, &p("istio-iptables").remote, &p("istio-ebpf").remote)?;
        }
    }
    let loaded = rss_by_proxy(&istio_pids, &ours_pids)?;
    let report = report(&samples, &idle, &loaded);
    let out = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into())).join("bench");
    std::fs::create_dir_all(&out)?;
    if perf {
        for row in ["istio-iptables", "istio-ebpf", "ours-ebpf"] {
            let dst = SocketAddr::new(p(row).remote.ip4().into(), PORT);
            profile(row, &p(row).client, dst, &proxies(row), &out)?;
        }
    }
    std::fs::write(out.join("side-by-side.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(out.join("side-by-side.svg"), chart(&samples))?;
    println!("\nfull results: {}", out.join("side-by-side.json").display());
    println!("chart: {}", out.join("side-by-side.svg").display());

    drop(istio);
    drop(cnis);
    capture.uninstall()?;
    a0.stop_and_uninstall()?;
    a1.stop_and_uninstall()?;
    let _ = std::fs::remove_file(mesh_config_path(&c));
    let _ = std::fs::remove_dir_all(ca_dir(&c));
    Ok(())
}

/// Profiles `pids` while `client` drives `dst` at max rate over 16 connections for 4 s.
fn profile(row: &str, client: &Pod, dst: SocketAddr, pids: &[u32], out: &Path) -> Result<()> {
    crate::benchkit::profile(row, pids, out, || {
        let load = client.run(move || crate::loadgen::blocking::max_rate(dst, 16, Duration::from_secs(4)));
        Ok(format!("max rate {:.0} req/s", load.context("max rate under perf")?.actual_qps))
    })
}

/// Fails the bench when a row's traffic did not take the path it is named for: Istio's
/// ztunnel must have logged connections to both Istio rows' servers, and our getsockopt
/// program must have answered Istio's outbound for the eBPF row.
fn verify_paths(
    istio: &[IstioZtunnel],
    capture: &ztunnel::redirect::Capture,
    ipt_server: &Pod,
    ebpf_server: &Pod,
) -> Result<()> {
    let log = istio[1].log();
    for server in [ipt_server, ebpf_server] {
        let addr = format!("{}:{PORT}", server.ip4());
        if !log.contains(&addr) {
            bail!("Istio's ztunnel on node 1 logged nothing for {addr}: that row bypassed it");
        }
    }
    let counters = capture.counters()?;
    if counters.getsockopt.captured == 0 || counters.connect4.captured == 0 {
        bail!("the eBPF row was not captured by our programs: {counters:?}");
    }
    Ok(())
}

/// RSS in MB of each proxy, summed over its two node processes.
fn rss_by_proxy(istio: &[u32], ours: &[u32]) -> Result<BTreeMap<&'static str, f64>> {
    let mb =
        |pids: &[u32]| pids.iter().map(|p| process_usage(*p).map(|u| u.rss_bytes as f64 / 1e6)).sum::<Result<f64>>();
    Ok(BTreeMap::from([("istio", mb(istio)?), ("ours", mb(ours)?)]))
}

type Metric = (&'static str, fn(&Sample) -> f64);

const METRICS: [Metric; 10] = [
    ("throughput Mbit/s (1 stream)", |s| s.throughput_mbps),
    ("p50 ms (c16, 1000 qps, 1 KiB)", |s| s.p50_ms),
    ("p90 ms", |s| s.p90_ms),
    ("p99 ms", |s| s.p99_ms),
    ("max keep-alive req/s (c16)", |s| s.max_qps),
    ("new connections/s (c8)", |s| s.conns_per_sec),
    ("proxy CPU s / 1000 req", |s| s.cpu_s_per_1k),
    ("proxy CPU s / GB", |s| s.cpu_s_per_gb),
    ("proxy cores at 1000 req/s", |s| s.cores_at_1000qps),
    ("proxy cores, fortio -jitter", |s| s.cores_at_1000qps_jitter),
];

/// Prints the table (medians, ratio to no-mesh) and returns it as JSON.
fn report(
    samples: &BTreeMap<String, Vec<Sample>>,
    idle: &BTreeMap<&str, f64>,
    loaded: &BTreeMap<&str, f64>,
) -> serde_json::Value {
    let med = |key: &str, f: fn(&Sample) -> f64| {
        median(samples.get(key).map(|v| v.iter().map(f).collect()).unwrap_or_default())
    };
    let mut placements = serde_json::Map::new();
    for placement in ["cross-node", "same-node"] {
        println!("\n{placement}: median of rounds (ratio to no-mesh)");
        print!("{:<30}", "metric");
        for row in ROWS {
            print!(" {row:>22}");
        }
        println!();
        let mut table = serde_json::Map::new();
        for (label, f) in METRICS {
            let base = med(&format!("{placement}/no-mesh"), f);
            print!("{label:<30}");
            let mut cells = serde_json::Map::new();
            for row in ROWS {
                let v = med(&format!("{placement}/{row}"), f);
                let per_proxy = label.starts_with("proxy ");
                if row == "no-mesh" && per_proxy {
                    print!(" {:>22}", "-");
                    continue;
                }
                if per_proxy || row == "no-mesh" {
                    print!(" {v:>22.4}");
                    cells.insert(row.into(), json!({ "value": v }));
                } else {
                    print!(" {:>13.3} ({:>5.2}x)", v, v / base);
                    cells.insert(row.into(), json!({ "value": v, "ratio_to_no_mesh": v / base }));
                }
            }
            println!();
            table.insert(label.into(), cells.into());
        }
        placements.insert(placement.into(), table.into());
    }
    println!(
        "\nproxy RSS MB (both nodes' processes)   idle: istio {:.1} ({:.1} with three pods, as ours), ours {:.1}   \
         after load: istio {:.1}, ours {:.1}",
        idle["istio"], idle["istio_three_pods"], idle["ours"], loaded["istio"], loaded["ours"]
    );
    json!({
        "rows": ROWS,
        "medians": placements,
        "rss_mb": { "idle": idle, "after_load": loaded },
        "rounds": samples,
    })
}

/// Latency percentiles and throughput per row, both placements, as one SVG.
fn chart(samples: &BTreeMap<String, Vec<Sample>>) -> String {
    let med = |key: &str, f: fn(&Sample) -> f64| {
        median(samples.get(key).map(|v| v.iter().map(f).collect()).unwrap_or_default())
    };
    let mut body = String::new();
    for (i, placement) in ["cross-node", "same-node"].iter().enumerate() {
        let lat: Vec<BarGroup> = ROWS
            .iter()
            .map(|row| {
                let k = format!("{placement}/{row}");
                BarGroup {
                    label: row.to_string(),
                    values: vec![med(&k, |s| s.p50_ms), med(&k, |s| s.p90_ms), med(&k, |s| s.p99_ms)],
                }
            })
            .collect();
        let tput: Vec<BarGroup> = ROWS
            .iter()
            .map(|row| BarGroup {
                label: row.to_string(),
                values: vec![med(&format!("{placement}/{row}"), |s| s.throughput_mbps)],
            })
            .collect();
        let y = i as f64 * 270.0;
        body += &svg_bar_chart(
            &format!("{placement}: latency, c16 at 1000 qps, 1 KiB"),
            "ms",
            &["p50", "p90", "p99"],
            &lat,
            0.0,
            y,
        );
        body +=
            &svg_bar_chart(&format!("{placement}: throughput, 1 stream"), "Mbit/s", &["throughput"], &tput, 570.0, y);
    }
    svg_document(1140.0, 545.0, &body)
}
