//! A node agent run as its own `ztunnel node` process (release build), so benchmarks can
//! measure the proxy's CPU time and memory apart from the load generator.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ztunnel::enrollment::EnrollmentClient;

use crate::{Cluster, Pod};

/// A running `ztunnel node` process for one node of a cluster.
pub struct AgentProcess {
    child: Child,
    args: Vec<String>,
    binary: PathBuf,
    socket: PathBuf,
    admin: std::net::SocketAddr,
}

/// A loopback port free right now (for a listener a child process opens next).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// CPU seconds (user + system) and resident memory of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// The flags a test agent of `cluster` needs besides its node's own: the cluster's CA
/// state, ephemeral admin ports, the cluster's local config when `workloads_yaml` is given
/// (written first), then `more`.
pub fn cluster_args(cluster: &Cluster, workloads_yaml: Option<&str>, more: &[&str]) -> Result<Vec<String>> {
    let mut args: Vec<String> = vec![
        "--ca-state-dir".into(),
        crate::mesh::ca_dir(cluster).display().to_string(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
        "--readiness-addr".into(),
        "127.0.0.1:0".into(),
    ];
    if let Some(yaml) = workloads_yaml {
        let config = crate::mesh::mesh_config_path(cluster);
        std::fs::create_dir_all(config.parent().context("config dir")?)?;
        std::fs::write(&config, yaml)?;
        args.extend(["--local-config".to_string(), config.display().to_string()]);
    }
    args.extend(more.iter().map(|s| s.to_string()));
    Ok(args)
}

impl AgentProcess {
    /// Starts `binary node` for `cluster.node(node)`, with extra CLI args.
    pub fn start(binary: &Path, cluster: &Cluster, node: usize, extra: &[String]) -> Result<Self> {
        Self::spawn(binary, cluster, node, extra, None, None)
    }

    /// Like [`AgentProcess::start`], with the agent's log (stdout) written to `log`.
    pub fn start_logging_to(
        binary: &Path,
        cluster: &Cluster,
        node: usize,
        extra: &[String],
        log: &Path,
    ) -> Result<Self> {
        Self::spawn(binary, cluster, node, extra, None, Some(log))
    }

    /// Starts `binary node --inpod-uds <zds>`: the agent connects to that ZDS socket (Istio's
    /// direction) and serves none; returns once the process runs.
    pub fn start_connecting(
        binary: &Path,
        cluster: &Cluster,
        node: usize,
        zds: &Path,
        extra: &[String],
    ) -> Result<Self> {
        Self::spawn(binary, cluster, node, extra, Some(zds), None)
    }

    fn spawn(
        binary: &Path,
        cluster: &Cluster,
        node: usize,
        extra: &[String],
        zds: Option<&Path>,
        log: Option<&Path>,
    ) -> Result<Self> {
        crate::mesh::ensure_bpffs()?;
        let n = cluster.node(node);
        let name = format!("{}-node{node}", cluster.prefix());
        let run_dir = PathBuf::from(crate::mesh::RUN_DIR).join(&name);
        let socket = run_dir.join("ztunnel.sock");
        let mut args: Vec<String> = vec![
            "node".into(),
            "--enrollment-socket".into(),
            socket.display().to_string(),
            "--state-dir".into(),
            run_dir.join("pods").display().to_string(),
            "--pin-dir".into(),
            PathBuf::from(crate::mesh::BPFFS).join(&name).display().to_string(),
            "--probe-source".into(),
            n.gateway4().to_string(),
            "--probe-source".into(),
            n.gateway6().to_string(),
            "--handoff-socket".into(),
            run_dir.join("handoff.sock").display().to_string(),
        ];
        if let Some(zds) = zds {
            args.extend(["--inpod-uds".to_string(), zds.display().to_string()]);
        }
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
        args.extend(["--admin-addr".to_string(), admin.to_string()]);
        args.extend(extra.iter().cloned());
        let child = Command::new(binary)
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdout(match log {
                Some(path) => Stdio::from(std::fs::File::create(path).context("agent log file")?),
                None => Stdio::null(),
            })
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut me = Self { child, args, binary: binary.to_path_buf(), socket, admin };
        if zds.is_some() {
            return Ok(me);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while EnrollmentClient::connect(&me.socket).is_err() {
            if let Some(status) = me.child.try_wait()? {
                bail!("agent exited early: {status}");
            }
            if Instant::now() > deadline {
                bail!("agent did not open {} in 10 s", me.socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }

    /// Enrolls a pod through the agent's socket.
    pub fn enroll(&self, pod: &Pod) -> Result<()> {
        crate::mesh::enroll_at(&self.socket, pod, "default", pod.name())
    }

    /// Waits up to `timeout` for the agent to exit on its own (after handing its pods to a
    /// successor); its exit status, or `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `method path` to the agent's admin port; the status code and body.
    pub fn admin(&self, method: &str, path: &str) -> Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&self.admin, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        Ok((status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
    }

    /// Flips the sockmap shortcut's kill switch (`POST /shortcut`); fails unless the agent
    /// runs with the shortcut installed.
    pub fn set_shortcut(&self, enabled: bool) -> Result<()> {
        let (status, body) = self.admin("POST", &format!("/shortcut?enabled={enabled}"))?;
        anyhow::ensure!(status == 200, "POST /shortcut: {status} {body}");
        Ok(())
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Current CPU time and RSS of the agent process.
    pub fn usage(&self) -> Result<Usage> {
        crate::benchkit::process_usage(self.child.id())
    }

    /// Stops the agent and removes everything it installed (`ztunnel node --uninstall`).
    pub fn stop_and_uninstall(mut self) -> Result<()> {
        self.shutdown();
        self.uninstall()
    }

    /// Kills the agent with SIGKILL, as a crash would: nothing is cleaned up.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs `ztunnel node --uninstall` with this agent's flags.
    pub fn uninstall(&self) -> Result<()> {
        let status = Command::new(&self.binary).args(&self.args).arg("--uninstall").env("RUST_LOG", "warn").status()?;
        if !status.success() {
            bail!("uninstall failed: {status}");
        }
        if let Some(run_dir) = self.socket.parent() {
            let _ = std::fs::remove_dir(run_dir);
        }
        Ok(())
    }

    fn shutdown(&mut self) {
        // SAFETY: plain signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.shutdown();
            let _ = self.uninstall();
        }
    }
}

/// The `ztunnel` binary of the calling test's build profile, built (or brought up to
/// date) once per test process with the same cargo, so tests never run a stale binary.
pub fn ztunnel_binary() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // A binary of this crate (demo, bench) sits beside `ztunnel` in <target>/<profile>;
        // its xtask builds that first.
        let in_deps = exe.parent().and_then(Path::file_name).is_some_and(|n| n == "deps");
        let sibling = exe.with_file_name("ztunnel");
        if !in_deps && sibling.is_file() {
            return sibling;
        }
        // A test: <target>/<profile>/deps/<test>-<hash>
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(&workspace).args(["build", "-p", "ztunnel", "--bin", "ztunnel"]);
        // Cargo gives a test these; build scripts (ring's, through cc) watch some of them, so
        // passing them on would make every later `cargo test` rebuild ring and all above it,
        // and this build rebuild them back (about 1.5 min each way on 2 cores).
        for (var, _) in std::env::vars_os() {
            let name = var.to_string_lossy();
            let set_for_tests =
                ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_BIN_", "CARGO_CRATE_NAME"].iter().any(|p| name.starts_with(p))
                    || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "CARGO_RUSTC_CURRENT_DIR"].contains(&&*name);
            if set_for_tests {
                cmd.env_remove(&var);
            }
        }
        if let Some(target_dir) = profile_dir.parent() {
            cmd.arg("--target-dir").arg(target_dir);
        }
        if profile_dir.file_name().and_then(|n| n.to_str()) == Some("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build -p ztunnel");
        assert!(status.success(), "cargo build -p ztunnel failed: {status}");
        let bin = profile_dir.join("ztunnel");
        assert!(bin.is_file(), "{} missing after build", bin.display());
        bin
    })
}
