//! A `ztunnel waypoint` process in a mini-cluster pod, and the local-config YAML a
//! waypoint scenario needs (workloads with labels, services that name the waypoint), so
//! tests and the demo set up L7 routing the same way.
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{Cluster, Pod};

/// Where the waypoint's Prometheus endpoint listens inside its pod.
pub const METRICS_ADDR: &str = "127.0.0.1:15020";

/// A running waypoint; killed when dropped.
pub struct WaypointProcess {
    child: Child,
    pod: Pod,
    routes: PathBuf,
}

impl WaypointProcess {
    /// Starts `ztunnel waypoint` in `pod` (which must not be enrolled: a waypoint's own
    /// traffic is not captured), signing its identity `default/waypoint` with the cluster's
    /// CA, reading the cluster's local config and the L7 objects in `routes`. Returns once
    /// it serves metrics.
    pub fn start(cluster: &Cluster, pod: &Pod, routes: &Path) -> Result<Self> {
        Self::start_with(cluster, pod, routes, &[])
    }

    /// [`Self::start`] with more command-line arguments (e.g. where traces go).
    pub fn start_with(cluster: &Cluster, pod: &Pod, routes: &Path, extra: &[String]) -> Result<Self> {
        let mut args: Vec<String> =
            vec!["--local-config".into(), crate::mesh::mesh_config_path(cluster).display().to_string()];
        args.extend(["--ca-state-dir".into(), crate::mesh::ca_dir(cluster).display().to_string()]);
        args.extend(extra.iter().cloned());
        Self::spawn(pod, routes, &args)
    }

    /// Starts `ztunnel waypoint` in `pod` with the L7 objects in `routes` and `args` saying
    /// where its state and certificate come from; returns once it serves metrics.
    pub fn spawn(pod: &Pod, routes: &Path, args: &[String]) -> Result<Self> {
        let mut all = vec!["--listen".to_string(), "[::]:15008".to_string()];
        all.extend(args.iter().cloned());
        Self::spawn_as("waypoint", pod, routes, &all)
    }

    /// Starts `ztunnel gateway` (the ingress gateway, default labels) in `pod` with the
    /// cluster's local config and CA, the L7 objects in `routes` and `extra` arguments;
    /// returns once it serves metrics.
    pub fn start_gateway(cluster: &Cluster, pod: &Pod, routes: &Path, extra: &[String]) -> Result<Self> {
        let mut args: Vec<String> =
            vec!["--local-config".into(), crate::mesh::mesh_config_path(cluster).display().to_string()];
        args.extend(["--ca-state-dir".into(), crate::mesh::ca_dir(cluster).display().to_string()]);
        args.extend(extra.iter().cloned());
        Self::spawn_as("gateway", pod, routes, &args)
    }

    /// Starts `ztunnel <role>` (`waypoint` or `gateway`) in `pod`.
    fn spawn_as(role: &str, pod: &Pod, routes: &Path, args: &[String]) -> Result<Self> {
        let mut cmd = Command::new(crate::agent_process::ztunnel_binary());
        let workers = std::env::var("WAYPOINT_WORKER_THREADS").unwrap_or_else(|_| "2".into());
        cmd.args([role, "--worker-threads", &workers])
            .arg("--routes-dir")
            .arg(routes)
            .args(args)
            .args([
                "--metrics-addr",
                METRICS_ADDR,
                "--readiness-addr",
                "127.0.0.1:15021",
                "--admin-addr",
                "127.0.0.1:15000",
            ])
            .env("RUST_LOG", std::env::var("WAYPOINT_LOG").unwrap_or_else(|_| "warn,access=info".into()));
        if std::env::var_os("WAYPOINT_LOG").is_none() {
            // Access-log lines go to a file the test can read (see [`Self::log`]).
            let file = std::fs::File::create(Self::log_path(routes)).context("waypoint log file")?;
            cmd.stdout(Stdio::from(file));
        }
        let child = pod.spawn(cmd).with_context(|| format!("spawning ztunnel {role}"))?;
        let mut w = WaypointProcess { child, pod: pod.clone(), routes: routes.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if w.metrics().is_ok() {
                return Ok(w);
            }
            if let Some(status) = w.child.try_wait()? {
                bail!("ztunnel {role} exited: {status}");
            }
            if Instant::now() > deadline {
                bail!("ztunnel {role} did not come up");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGTERM (as the kubelet does) and waits up to `within` for the process to end.
    pub fn terminate(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("sending SIGTERM")?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("still running {within:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(routes: &Path) -> PathBuf {
        routes.with_extension("stdout")
    }

    /// What the waypoint wrote to stdout so far (its access-log lines); empty when
    /// `WAYPOINT_LOG` sends it to the test's own output instead.
    pub fn log(&self) -> String {
        std::fs::read_to_string(Self::log_path(&self.routes)).unwrap_or_default()
    }

    /// The process id (for CPU and memory readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The waypoint's Prometheus exposition.
    pub fn metrics(&self) -> Result<String> {
        let (status, body, _) =
            crate::bookinfo::get(&self.pod, METRICS_ADDR.parse()?, "/metrics", "", &[], Duration::from_secs(2))?;
        if status != 200 {
            bail!("metrics answered {status}");
        }
        Ok(body)
    }

    /// The sum of the samples of `name` whose labels include every `key="value"` of `labels`.
    pub fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(sum_samples(&self.metrics()?, name, labels))
    }

    /// Waits (up to 3 s) for the sum of `name`'s samples with `labels` to reach `expected`
    /// (a request is counted when its response has been sent, which the client may see first)
    /// and returns the last value read.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], expected: f64) -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let v = self.metric_sum(name, labels)?;
            if v >= expected || Instant::now() > deadline {
                return Ok(v);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replaces the L7 objects file `file` in the routes directory and waits until the
    /// waypoint has re-read it (`ztunnel_config_rejected_total` or the config dump moved is
    /// not observable from here, so the wait is a fixed 600 ms: three polls).
    pub fn write_routes(&self, file: &str, yaml: &str) -> Result<()> {
        write_atomically(&self.routes.join(file), yaml)?;
        std::thread::sleep(Duration::from_millis(600));
        Ok(())
    }
}

impl Drop for WaypointProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(Self::log_path(&self.routes));
    }
}

/// Writes `path` through a temporary file and a rename, so readers never see half a file.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Sums the samples of `name` in an exposition whose labels include all of `labels`.
pub fn sum_samples(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A local-config `workloads` entry for an app pod of `service` (port `port`), with its
/// `app`/`version` labels (what DestinationRule subsets select).
pub fn app_workload(pod: &Pod, service: &str, port: u16, app: &str, version: &str) -> String {
    crate::mesh::workload_yaml(
        pod,
        "default",
        app,
        &format!(
            "  services:\n    default/{service}.default.svc.cluster.local:\n      {port}: {port}\n  canonicalName: {app}\n  canonicalRevision: {version}\n  labels:\n    app: {app}\n    version: {version}\n"
        ),
    )
}

/// The waypoint pod's workload entry (identity `default/waypoint`).
pub fn waypoint_workload(pod: &Pod) -> String {
    crate::mesh::workload_yaml(pod, "default", "waypoint", "  canonicalName: waypoint\n")
}

/// A `services` entry: `name` on `vip:port`, sent through the waypoint at `waypoint` when given.
pub fn service(name: &str, vip: Ipv4Addr, port: u16, waypoint: Option<&Pod>) -> String {
    let mut s = format!(
        "- name: {name}\n  namespace: default\n  hostname: {name}.default.svc.cluster.local\n  vips: [\"{vip}\"]\n  ports:\n    {port}: {port}\n"
    );
    if let Some(w) = waypoint {
        s.push_str(&format!("  waypoint:\n    address: {}\n", w.ip4()));
    }
    s
}

/// `vip:port` as a socket address.
pub fn vip(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}
