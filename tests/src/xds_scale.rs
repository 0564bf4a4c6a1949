//! The control plane at scale (a bench scenario, `cargo xtask bench --only xds-scale`): a
//! release `ztunnel controller` serving 10,000 workloads and 2,000 services to one release
//! `ztunnel node`. Reports the time to full sync, the agent's RSS growth for that state, the
//! controller's RSS, and the time from a file edit to the change applied at the agent.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::agent_process::{cluster_args, AgentProcess};
use crate::Cluster;

const WORKLOADS: usize = 10_000;
const SERVICES: usize = 2_000;
const NODE: &str = "node-a";

/// One Namespace (ambient), `WORKLOADS` pods on `NODE` (5 per service, labelled `svc: s<i>`),
/// `SERVICES` services selecting them.
fn write_config(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut ns = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: scale\n  labels:\n    istio.io/dataplane-mode: ambient\n",
    );
    ns.push('\n');
    std::fs::write(dir.join("namespace.yaml"), ns)?;
    let mut pods = String::new();
    for i in 0..WORKLOADS {
        let (a, b) = (i / 250, i % 250 + 1);
        pods.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: scale\n  labels:\n    svc: s{}\nspec:\n  nodeName: {NODE}\n  serviceAccountName: sa{}\n  containers:\n  - name: app\n    image: app\nstatus:\n  podIP: 10.{}.{a}.{b}\n",
            i % SERVICES,
            i % 100,
            100 + a / 250,
        ));
    }
    std::fs::write(dir.join("pods.yaml"), pods)?;
    let mut svcs = String::new();
    for i in 0..SERVICES {
        svcs.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s{i}\n  namespace: scale\nspec:\n  clusterIP: 10.96.{}.{}\n  selector:\n    svc: s{i}\n  ports:\n  - port: 80\n    targetPort: 8080\n",
            i / 250,
            i % 250 + 1
        ));
    }
    std::fs::write(dir.join("services.yaml"), svcs)?;
    Ok(())
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(str::to_string)))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

use crate::agent_process::free_port;

/// GET `path` from `addr`; the body.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// `ztunnel_xds_messages_total` summed over types, from the agent's metrics.
fn messages(metrics: SocketAddr) -> u64 {
    http_get(metrics, "/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("ztunnel_xds_messages_total{"))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the scenario; prints a table and returns the numbers.
pub fn run(binary: &Path) -> Result<serde_json::Value> {
    let work = PathBuf::from(crate::mesh::RUN_DIR).join(format!("xds-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let config = work.join("config");
    write_config(&config)?;
    let port = free_port()?;
    let root = work.join("root.pem");
    let started = Instant::now();
    let controller = Controller(
        Command::new(binary)
            .args(["controller", "--config-dir"])
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0"])
            .arg("--ca-state-dir")
            .arg(work.join("ca"))
            .arg("--tokens-dir")
            .arg(work.join("tokens"))
            .arg("--root-cert-out")
            .arg(&root)
            // The ADS server's per-push lines time each edit's push (see `stages`).
            .env("RUST_LOG", "info,ztunnel::controller::ads=debug")
            .env("NO_COLOR", "1")
            .stdout(std::fs::File::create(work.join("controller.log"))?)
            .spawn()
            .context("starting the controller")?,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !root.exists() || TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("controller did not come up in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let controller_up = started.elapsed();
    let controller_rss = rss_kb(controller.0.id());

    let c = Cluster::new(1).context("mini-cluster (needs root)")?;
    let metrics_port = free_port()?;
    let extra = cluster_args(
        &c,
        None,
        &[
            "--xds-address",
            &format!("https://127.0.0.1:{port}"),
            "--xds-root-ca",
            &root.display().to_string(),
            "--control-plane-server-name",
            "localhost",
            "--auth-token",
            &work.join("tokens").join(NODE).display().to_string(),
            "--node-name",
            NODE,
        ],
    )?;
    // A known metrics port to poll instead of an ephemeral one.
    let mut extra = extra;
    if let Some(i) = extra.iter().position(|a| a == "--metrics-addr") {
        extra[i + 1] = format!("127.0.0.1:{metrics_port}");
    }
    let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse()?;
    let t0 = Instant::now();
    let agent_log = work.join("agent.log");
    let agent = AgentProcess::start_logging_to(binary, &c, 0, &extra, &agent_log)?;
    let empty_rss = rss_kb(agent.pid());
    let deadline = Instant::now() + Duration::from_secs(60);
    while messages(metrics) < 2 {
        if Instant::now() > deadline {
            bail!("agent did not sync in 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let sync = t0.elapsed();
    std::thread::sleep(Duration::from_secs(6)); // past a heap-trim period
    let synced_rss = rss_kb(agent.pid());
    // Each applied response logged with its time, for the breakdown of an edit's path.
    agent.admin("POST", "/logging?level=warn%2Cztunnel%3A%3Axds%3A%3Aclient%3Ddebug")?;

    // One change at a time, each timed from the write until the agent applied the responses it causes: a new
    // service (one Address response), then a new DENY policy selecting five pods (its Authorization response and
    // the Address response re-listing those pods' policies).
    let mut written = Vec::new();
    let mut timed_edit = |file: String, yaml: String, responses: u64| -> Result<f64> {
        let before = messages(metrics);
        let t = Instant::now();
        written.push(seconds_of_day(std::time::SystemTime::now()));
        std::fs::write(config.join(&file), yaml)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while messages(metrics) < before + responses {
            if Instant::now() > deadline {
                bail!("edit {file} not applied in 30 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        std::thread::sleep(Duration::from_millis(500));
        Ok(ms)
    };
    let mut edits = Vec::new();
    for i in 0..5 {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: extra{i}\n  namespace: scale\nspec:\n  clusterIP: 10.97.0.{}\n  selector:\n    svc: s{i}\n  ports:\n  - port: 81\n",
            i + 1
        );
        edits.push(timed_edit(format!("extra{i}.yaml"), yaml, 1)?);
    }
    let mut denies = Vec::new();
    for i in 0..5 {
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny{i}\n  namespace: scale\nspec:\n  selector:\n    matchLabels:\n      svc: s{}\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"8080\"]\n",
            100 + i
        );
        denies.push(timed_edit(format!("deny{i}.yaml"), yaml, 2)?);
    }
    written.truncate(edits.len());
    denies.sort_by(|a, b| a.total_cmp(b));
    let stages = stages(&written, &work.join("controller.log"), &agent_log);
    edits.sort_by(|a, b| a.total_cmp(b));
    // The controller's own account of its last reload (read, model, total).
    let log = std::fs::read_to_string(work.join("controller.log")).unwrap_or_default();
    let reload = log.lines().rfind(|l| l.contains("config changed")).unwrap_or("").to_string();
    let controller_rss_serving = rss_kb(controller.0.id());
    println!("\ncontrol plane at scale: {WORKLOADS} workloads, {SERVICES} services, one node agent");
    println!("  controller start (load + translate + listen): {:.2} s", controller_up.as_secs_f64());
    println!("  agent start to full sync:                     {:.2} s  (target < 2 s)", sync.as_secs_f64());
    println!(
        "  agent RSS: {:.1} MB empty -> {:.1} MB synced: +{:.1} MB (target < 30 MB)",
        empty_rss as f64 / 1024.0,
        synced_rss as f64 / 1024.0,
        (synced_rss as f64 - empty_rss as f64) / 1024.0
    );
    println!(
        "  controller RSS: {:.1} MB loaded, {:.1} MB serving",
        controller_rss as f64 / 1024.0,
        controller_rss_serving as f64 / 1024.0
    );
    println!(
        "  file edit -> applied at the agent: median {:.0} ms, max {:.0} ms over {} edits (target < 100 ms; \
         the controller sees the file through inotify)",
        edits[edits.len() / 2],
        edits[edits.len() - 1],
        edits.len()
    );
    println!(
        "  new DENY policy -> applied at the agent (policy and the 5 workloads listing it): median {:.0} ms, max {:.0} ms",
        denies[denies.len() / 2],
        denies[denies.len() - 1]
    );
    println!("  controller's last reload: {}", reload.split_once("version=").map(|(_, r)| r).unwrap_or(&reload));
    let median = |k: usize| {
        let mut v: Vec<f64> = stages.iter().map(|s| s[k]).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    println!(
        "  where an edit's time goes (median ms from the write, from the logs): model built and published {:.0}, \
         pushed to the agent {:.0}, applied by the agent {:.0} (of which applying {:.1})",
        median(0),
        median(1),
        median(2),
        median(3)
    );
    drop(agent);
    drop(controller);
    let _ = std::fs::remove_dir_all(&work);
    Ok(json!({
        "workloads": WORKLOADS, "services": SERVICES,
        "controller_start_s": controller_up.as_secs_f64(), "full_sync_s": sync.as_secs_f64(),
        "agent_rss_kb_empty": empty_rss, "agent_rss_kb_synced": synced_rss,
        "controller_rss_kb": controller_rss_serving, "edit_to_applied_ms": edits, "deny_to_applied_ms": denies,
        "edit_stages_ms": stages,
    }))
}

/// `text` without terminal colour codes (the agent's log is written as if to a terminal).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('\u{1b}') {
        out.push_str(&rest[..i]);
        rest = rest[i..].find('m').map_or("", |j| &rest[i + j + 1..]);
    }
    out.push_str(rest);
    out
}

/// Seconds since midnight UTC: what the logs' timestamps can be compared with.
fn seconds_of_day(t: std::time::SystemTime) -> f64 {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (since.as_secs() % 86_400) as f64 + f64::from(since.subsec_micros()) / 1e6
}

/// A log line's timestamp (`2026-01-01T10:50:24.551658Z ...`) as seconds since midnight.
fn log_time(line: &str) -> Option<f64> {
    let time = line.split_once('T')?.1.split_once('Z')?.0;
    let mut parts = time.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// For each edit written at `written[i]`: milliseconds until the controller published the new model, until it
/// pushed it to the agent, and until the agent applied it (the first such log line after the write), and the
/// agent's own time applying it.
fn stages(written: &[f64], controller_log: &Path, agent_log: &Path) -> Vec<[f64; 4]> {
    let read = |p: &Path, needle: &str| -> Vec<f64> {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        text.lines().filter(|l| l.contains(needle)).filter_map(log_time).collect()
    };
    let published = read(controller_log, "config changed");
    let pushed = read(controller_log, "push ");
    let agent_text = strip_ansi(&std::fs::read_to_string(agent_log).unwrap_or_default());
    let applied: Vec<(f64, f64)> = agent_text
        .lines()
        .filter(|l| l.contains("xDS applied"))
        .filter_map(|l| {
            let us = l.split("apply_us=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse::<f64>().ok()?;
            Some((log_time(l)?, us / 1000.0))
        })
        .collect();
    let after = |times: &[f64], t: f64| times.iter().find(|x| **x >= t).map_or(f64::NAN, |x| (x - t) * 1000.0);
    let times: Vec<f64> = applied.iter().map(|a| a.0).collect();
    let own = |t: f64| applied.iter().find(|a| a.0 >= t).map_or(f64::NAN, |a| a.1);
    written.iter().map(|w| [after(&published, *w), after(&pushed, *w), after(&times, *w), own(*w)]).collect()
}
