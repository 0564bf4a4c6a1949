//! A real Prometheus (Debian's `prometheus`, installed by `cargo xtask setup`) scraping the
//! mini-cluster: it runs in a pod's netns, with every scrape target forwarded into that pod,
//! and is queried over its HTTP API. The observability tests and `cargo xtask demo --observe`
//! use it to run the chart's dashboard queries and Kiali's graph queries against live data.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::forward::PortForward;
use crate::{InNetns, Pod};

/// Where Prometheus serves its API inside its pod.
const API: &str = "127.0.0.1:9090";

/// One scrape target, as seen from the caller's netns.
#[derive(Debug, Clone)]
pub struct Target {
    pub job: String,
    pub addr: SocketAddr,
    /// Target labels, as the chart's relabelling would attach them (e.g. `app`).
    pub labels: Vec<(String, String)>,
    /// `addr` is inside Prometheus's own pod (scraped as is, not forwarded).
    pub in_pod: bool,
}

/// A running Prometheus; stopped (and its data removed) when dropped.
pub struct Prometheus {
    child: Child,
    pod: Pod,
    dir: PathBuf,
    _forwards: Vec<PortForward>,
}

/// Percent-encodes a query-string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Prometheus {
    /// Starts Prometheus in `pod` (which must not be enrolled: its scrapes are not mesh
    /// traffic), scraping `targets` every second, with `rules` loaded when given. Working
    /// files go under `dir`. Returns once it answers queries.
    pub fn start(pod: &Pod, dir: &Path, targets: &[Target], rules: Option<&Path>) -> Result<Self> {
        let binary = "prometheus";
        std::fs::create_dir_all(dir)?;
        let mut forwards = Vec::new();
        let mut jobs: Vec<(String, Vec<String>)> = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            // Each target outside the pod gets its own local port inside it.
            let local = if t.in_pod {
                t.addr
            } else {
                let local = SocketAddr::from(([127, 0, 0, 1], 19100 + i as u16));
                forwards.push(PortForward::start(pod, local, t.addr)?);
                local
            };
            let labels: String = t.labels.iter().map(|(k, v)| format!("{k}: \"{v}\", ")).collect();
            let entry =
                format!("      - targets: [\"{local}\"]\n        labels: {{{labels}instance: \"{}\"}}\n", t.addr);
            match jobs.iter_mut().find(|(j, _)| *j == t.job) {
                Some((_, e)) => e.push(entry),
                None => jobs.push((t.job.clone(), vec![entry])),
            }
        }
        let mut cfg = String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n");
        if let Some(r) = rules {
            cfg += &format!("rule_files: [\"{}\"]\n", r.display());
        }
        cfg += "scrape_configs:\n";
        for (job, entries) in &jobs {
            cfg += &format!("  - job_name: \"{job}\"\n    metrics_path: /stats/prometheus\n    static_configs:\n");
            for e in entries {
                cfg += e;
            }
        }
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, &cfg)?;
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={API}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(dir.join("prometheus.log"))?));
        let child = pod.spawn(cmd).with_context(|| {
            format!("starting {binary} (installed by `cargo xtask setup`, Debian package prometheus)")
        })?;
        let mut p = Prometheus { child, pod: pod.clone(), dir: dir.to_path_buf(), _forwards: forwards };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if p.get("/-/ready").is_ok_and(|(code, _)| code == 200) {
                return Ok(p);
            }
            if let Some(status) = p.child.try_wait()? {
                bail!("prometheus exited ({status}): {}", p.log());
            }
            if Instant::now() > deadline {
                bail!("prometheus did not become ready: {}", p.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Prometheus's own log (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Result<(u16, String)> {
        let path = path.to_string();
        self.pod.run(move || -> Result<(u16, String)> {
            let mut s = TcpStream::connect_timeout(&API.parse()?, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {API}\r\n\r\n")?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw)?;
            let text = String::from_utf8_lossy(&raw).into_owned();
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            Ok((code, body.to_string()))
        })
    }

    /// Runs an instant query; an error is Prometheus's own (`bad_data: parse error ...`).
    /// Returns the result vector's samples.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let (_, body) = self.get(&format!("/api/v1/query?query={}", encode(promql)))?;
        let v: Value = serde_json::from_str(&body).with_context(|| format!("not JSON: {body}"))?;
        if v["status"] != "success" {
            bail!("{}: {}", v["errorType"].as_str().unwrap_or("error"), v["error"].as_str().unwrap_or(&body));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Queries until the result is non-empty (scrapes come every second).
    pub fn wait_nonempty(&self, promql: &str, timeout: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.query(promql)?;
            if !r.is_empty() {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!("no result for {promql} within {timeout:?}; targets: {}", self.targets_summary());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `/api/v1/rules`, parsed.
    pub fn rules(&self) -> Result<Value> {
        let (_, body) = self.get("/api/v1/rules")?;
        Ok(serde_json::from_str(&body)?)
    }

    /// Each target's job, health and last error, for failure messages.
    pub fn targets_summary(&self) -> String {
        let Ok((_, body)) = self.get("/api/v1/targets") else { return "(unavailable)".into() };
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["activeTargets"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .map(|t| format!("{} {} {} {}", t["labels"]["job"], t["scrapeUrl"], t["health"], t["lastError"]))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
