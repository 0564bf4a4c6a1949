//! Istio's own ztunnel as a test peer (DESIGN §11): finding its binary, running it in
//! dedicated mode inside one mini-cluster pod behind istio-cni's real in-pod iptables rules,
//! or in shared (in-pod) mode as a node's agent enrolled over ZDS, reading its access log,
//! metrics and admin state, and the public `FAKE_CA` test root it signs with,
//! written out as Istio plug-in CA files so our agent issues from the same root.
//!
//! The peer never ships with the project: tests that need it call [`peer_or_skip`], which
//! prints one line and lets them return when it is absent (a fresh clone has no
//! `../shared`), while CI, which has it, runs them.
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::mesh::RUN_DIR;
use crate::{InNetns, Node, Pod};

/// Environment variable naming Istio's ztunnel binary.
pub const PEER_ENV: &str = "ISTIO_ZTUNNEL";
/// The packet mark Istio's ztunnel puts on its own sockets (istio-cni's rules skip it).
pub const PACKET_MARK: u32 = 1337;

/// Istio's `FAKE_CA` root certificate, from istio/ztunnel `src/tls/root-cert.pem`.
pub const FAKE_CA_ROOT_PEM: &str = include_str!("../data/istio-fake-ca/root-cert.pem");
/// Its signing key, from istio/ztunnel `src/tls/ca-key.pem` (public test material).
pub const FAKE_CA_KEY_PEM: &str = include_str!("../data/istio-fake-ca/ca-key.pem");

/// The repository root (the tests crate's parent).
fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests crate has a parent")
}

/// Where the shared peers and fixtures live beside a CI checkout.
fn shared_dir() -> PathBuf {
    repo_root().join("..").join("shared")
}

/// Istio's ztunnel: `$ISTIO_ZTUNNEL`, else `../shared/peers/ztunnel` beside the repository.
pub fn peer_binary() -> Option<PathBuf> {
    let from_env = std::env::var_os(PEER_ENV).map(PathBuf::from).filter(|p| p.is_file());
    from_env.or_else(|| Some(shared_dir().join("peers").join("ztunnel")).filter(|p| p.is_file()))
}

/// The peer binary, or `None` after printing (once per test binary, straight to stderr so
/// the test harness does not swallow it) that the interop suite did not run.
pub fn peer_or_skip() -> Option<PathBuf> {
    static SKIP_NOTICE: Once = Once::new();
    let found = peer_binary();
    if found.is_none() {
        SKIP_NOTICE.call_once(|| {
            let _ = writeln!(
                std::io::stderr(),
                "interop suite did NOT run: Istio's ztunnel not found (set {PEER_ENV} or put it at {})",
                shared_dir().join("peers").join("ztunnel").display()
            );
        });
    }
    found
}

/// A directory the caller owns; removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `RUN_DIR/<name>` afresh (name it with the cluster prefix, so a crashed test's
    /// leftovers are swept with its pins).
    pub fn new(name: &str) -> Result<Self> {
        let path = PathBuf::from(RUN_DIR).join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the `FAKE_CA` root as Istio plug-in CA files: the root signs directly, so it is
/// the CA certificate, the whole chain and the trusted root at once.
pub fn write_fake_ca_plugin_dir(dir: &Path) -> Result<()> {
    use ztunnel::identity::ca_files as files;
    for (name, pem) in [
        (files::CA_CERT, FAKE_CA_ROOT_PEM),
        (files::CA_KEY, FAKE_CA_KEY_PEM),
        (files::ROOT_CERT, FAKE_CA_ROOT_PEM),
        (files::CERT_CHAIN, FAKE_CA_ROOT_PEM),
    ] {
        std::fs::write(dir.join(name), pem).with_context(|| format!("writing {name}"))?;
    }
    Ok(())
}

/// The directory holding istio-cni's in-pod iptables golden files.
pub fn cni_rules_dir() -> PathBuf {
    shared_dir().join("fixtures").join("istio-cni-iptables")
}

/// Installs istio-cni's in-pod rules (`default.golden`, v4, and the v6 half of
/// `default_ipv6.golden`) in `pod`'s netns with `iptables-restore` / `ip6tables-restore`,
/// as istio-cni does: outbound TCP redirected to 15001, inbound to 15006 except 15008,
/// mark 0x539 exempt. The golden files are istio-cni's recorded form: the recorded
/// `iptables-save` commands are dropped and `* table` becomes `*table`.
pub fn install_istio_cni_rules(pod: &Pod) -> Result<()> {
    let dir = cni_rules_dir();
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| {
            format!("reading istio-cni rules {} (the interop tests need ../shared/fixtures)", path.display())
        })
    };
    let v4 = restore_input(&read("default.golden")?, 0)?;
    let v6 = restore_input(&read("default_ipv6.golden")?, 1)?;
    for (tool, rules) in [("iptables-restore", v4), ("ip6tables-restore", v6)] {
        let mut cmd = Command::new(tool);
        cmd.arg("-w").stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child =
            pod.spawn(cmd).with_context(|| format!("{tool} (apt package iptables; `cargo xtask setup`)"))?;
        child.stdin.take().expect("stdin piped").write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{tool} in {}: {}", pod.name(), String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    Ok(())
}

/// The `index`-th rule set (one `*mangle` .. `COMMIT` group of tables) of a golden file, in
/// `iptables-restore` syntax.
fn restore_input(golden: &str, index: usize) -> Result<String> {
    let mut sets: Vec<String> = Vec::new();
    for line in golden.lines() {
        if line.ends_with("tables-save") {
            continue;
        }
        let line = line.strip_prefix("* ").map(|t| format!("*{t}")).unwrap_or_else(|| line.to_string());
        if line == "*mangle" {
            sets.push(String::new());
        }
        let set = sets.last_mut().ok_or_else(|| anyhow!("golden file does not start with a table"))?;
        set.push_str(&line);
        set.push('\n');
    }
    sets.into_iter().nth(index).ok_or_else(|| anyhow!("golden file has no rule set {index}"))
}

/// Istio's local-config shape, read by Istio's ztunnel and ours alike: each pod an HBONE
/// workload of namespace `default` (trust domain `cluster.local`, which Istio's ztunnel needs
/// to build `spiffe://` identities), its service account named after it.
pub fn local_config(pods: &[&Pod]) -> String {
    let workloads: String = pods
        .iter()
        .map(|p| {
            format!(
                "- uid: {uid}\n  name: {name}\n  namespace: default\n  serviceAccount: {name}\n  trustDomain: cluster.local\n  workloadIps: [\"{ip4}\", \"{ip6}\"]\n  protocol: HBONE\n  services: {{}}\n",
                uid = p.uid(),
                name = p.name(),
                ip4 = p.ip4(),
                ip6 = p.ip6()
            )
        })
        .collect();
    format!("workloads:\n{workloads}services: []\npolicies: []\n")
}

/// One Istio ztunnel process, in dedicated mode (one pod) or shared mode (a node's pods,
/// enrolled over ZDS); killed when dropped.
pub struct IstioZtunnel {
    child: Child,
    /// The netns its admin (15000), metrics (15020) and readiness (15021) ports live in:
    /// the pod's in dedicated mode, the node's in shared mode.
    netns: File,
    dir: TempDir,
}

impl IstioZtunnel {
    /// Starts `binary` inside `pod` (its netns and cgroup) for workload
    /// `namespace/pod-name/service_account`, with `local_config` (Istio's local-config YAML)
    /// as its whole state, certificates from `FAKE_CA`, JSON logs, and `ENABLE_ORIG_SRC=false`
    /// (its inbound then dials the app from the pod's own address, so replies need no
    /// routing); waits until its readiness endpoint answers 200.
    pub fn start(
        binary: &Path,
        pod: &Pod,
        namespace: &str,
        service_account: &str,
        local_config: &str,
        dir_name: &str,
    ) -> Result<Self> {
        let dir = TempDir::new(dir_name)?;
        let mut cmd = base_command(binary, &dir, local_config)?;
        cmd.env("PROXY_MODE", "dedicated")
            .env("PROXY_WORKLOAD_INFO", format!("{namespace}/{}/{service_account}", pod.name()))
            .env("PACKET_MARK", PACKET_MARK.to_string());
        let child = pod.spawn(cmd).context("spawning Istio's ztunnel")?;
        let mut z = Self { child, netns: pod.netns_file().try_clone()?, dir };
        z.wait_ready().with_context(|| format!("Istio's ztunnel in {}; its log:\n{}", pod.name(), z.log()))?;
        Ok(z)
    }

    /// Starts `binary` as `node`'s shared in-pod ztunnel (Istio's default mode), in the
    /// node's netns: it connects to the ZDS socket `zds` (`INPOD_UDS`), says hello, and opens
    /// each pod's listeners inside the pod netns it is handed, its sockets marked
    /// [`PACKET_MARK`]. State, certificates and logs as [`IstioZtunnel::start`]. Waits until it
    /// is ready, which Istio's ztunnel only is once the CNI side's first snapshot
    /// (`SnapshotSent`) arrived: whatever serves `zds` must be running and synced.
    pub fn start_shared(binary: &Path, node: &Node, zds: &Path, local_config: &str, dir_name: &str) -> Result<Self> {
        Self::start_shared_with(binary, node, None, zds, local_config, dir_name, &[])
    }

    /// [`IstioZtunnel::start_shared`], with the process in the cgroup `cgroup` (e.g. one our
    /// eBPF capture knows as the proxy's) when given, and more environment (which wins over
    /// the defaults; an empty value removes one), e.g. `CA_ADDRESS`, `CA_ROOT_CA` and `AUTH_TOKEN` with `FAKE_CA=false` to
    /// get its certificates from a real CA.
    pub fn start_shared_with(
        binary: &Path,
        node: &Node,
        cgroup: Option<&Path>,
        zds: &Path,
        local_config: &str,
        dir_name: &str,
        env: &[(&str, String)],
    ) -> Result<Self> {
        let dir = TempDir::new(dir_name)?;
        let mut cmd = base_command(binary, &dir, local_config)?;
        cmd.env("PROXY_MODE", "shared").env("INPOD_UDS", zds).env("PACKET_MARK", PACKET_MARK.to_string());
        for (k, v) in env {
            // An empty value removes the default (e.g. LOCAL_XDS_PATH, to run on xDS alone).
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let child =
            crate::netns::spawn_in_netns_cmd(node.netns_file(), cgroup, cmd).context("spawning Istio's ztunnel")?;
        let mut z = Self { child, netns: node.netns_file().try_clone()?, dir };
        z.wait_ready().with_context(|| format!("Istio's ztunnel on {}; its log:\n{}", node.name(), z.log()))?;
        Ok(z)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("exited early: {status}");
            }
            if matches!(self.get(15021, "/healthz/ready"), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not ready after 15 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET path` on one of its ports, from inside its netns: (status, body).
    pub fn get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        let path = path.to_string();
        crate::in_netns(&self.netns, move || http_get(SocketAddr::from(([127, 0, 0, 1], port)), &path))
    }

    /// Its admin `/config_dump` as JSON. In shared mode, `workloadState` maps each pod uid
    /// it was handed over ZDS to `{state: Pending|Up, info: {name, namespace, serviceAccount}}`.
    pub fn config_dump(&self) -> Result<serde_json::Value> {
        match self.get(15000, "/config_dump")? {
            (200, body) => serde_json::from_str(&body).context("config_dump is not JSON"),
            (status, body) => bail!("config_dump answered {status}: {body}"),
        }
    }

    /// Its Prometheus metrics (port 15020).
    pub fn metrics(&self) -> Result<String> {
        match self.get(15020, "/metrics")? {
            (200, body) => Ok(body),
            (status, body) => bail!("metrics answered {status}: {body}"),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ztunnel.log")).unwrap_or_default()
    }

    /// Its access-log entries (JSON, scope `access`) so far.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["scope"] == "access")
            .collect()
    }

    /// Waits up to `timeout` for an access-log entry matching `pred` among those after the
    /// first `since` (e.g. the [`IstioZtunnel::access_log`] length before the traffic); the
    /// error shows its log.
    pub fn wait_access_log(
        &self,
        since: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.access_log().into_iter().skip(since).find(&pred) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("no matching access-log entry from Istio's ztunnel; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl IstioZtunnel {
    /// Kills it (SIGKILL, as a crash would) and waits for it to exit; its log stays readable.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for IstioZtunnel {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What both modes share: a clean environment, `local_config` (written into `dir`) as its
/// whole state (`LOCAL_XDS_PATH`, no xDS server), `FAKE_CA` certificates, JSON logs into
/// `dir/ztunnel.log`, `ENABLE_ORIG_SRC=false`, and `dir` as its working directory.
fn base_command(binary: &Path, dir: &TempDir, local_config: &str) -> Result<Command> {
    let config = dir.path().join("local-config.yaml");
    std::fs::write(&config, local_config)?;
    let log = File::create(dir.path().join("ztunnel.log"))?;
    let mut cmd = Command::new(binary);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("FAKE_CA", "true")
        .env("XDS_ADDRESS", "")
        .env("LOCAL_XDS_PATH", &config)
        .env("ENABLE_ORIG_SRC", "false")
        .env("CLUSTER_ID", "Kubernetes")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(cmd)
}

/// The TCP ports listening in `netns` (v4 and v6).
pub fn listening_ports(netns: &impl InNetns) -> Result<std::collections::BTreeSet<u16>> {
    Ok(crate::listening_sockets(netns)?.into_iter().collect())
}

/// A minimal HTTP/1.1 GET from the calling thread's netns: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Sum of the samples of `family` whose labels include every `key="value"` in `labels`.
pub fn metric_sum(text: &str, family: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| l.strip_prefix(family).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .map(|v| v as u64)
        .sum()
}
