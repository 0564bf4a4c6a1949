//! Enrollment in Istio's direction on the mini-cluster: `ztunnel cni` run in-process for a
//! node (serving the ZDS socket its node agent connects to, and the plugin socket), the
//! real `ztunnel` binary run as the CNI plugin exactly as a container runtime runs it
//! (`ztunnel-cni`, CNI_* environment, network config on stdin), and a bare ZDS listener
//! for tests that play the CNI side themselves.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use prost::Message;
use serde_json::{json, Value};
use ztunnel::cni::{CniConfig, CniDaemon, CniStatus};
use ztunnel::enrollment::{recv_datagram, EnrollmentClient, ZdsHello};

use crate::mesh::{ControlPlaneAccess, RUN_DIR};
use crate::{Cluster, Pod};

/// Outbound destination port [`CniNode::start_with_capture`] never captures.
pub const EXCLUDED_OUTBOUND_PORT: u16 = 9090;
/// Inbound pod port [`CniNode::start_with_capture`] never captures.
pub const EXCLUDED_INBOUND_PORT: u16 = 9091;

/// A `ztunnel cni` daemon for one node, on its own runtime. Dropping it stops the daemon
/// and removes its sockets, pod records and plugin directory.
pub struct CniNode {
    rt: tokio::runtime::Runtime,
    daemon: Option<CniDaemon>,
    cfg: CniConfig,
    dir: PathBuf,
    plugin: PluginBin,
}

impl CniNode {
    /// Starts the daemon for `cluster.node(node)`, learning ambient pods from `cp` with that
    /// node's token; ADDs wait at most 5 s for enrollment.
    pub fn start(cluster: &Cluster, node: usize, cp: &ControlPlaneAccess) -> Result<Self> {
        Self::start_full(cluster, node, cp, None)
    }

    /// Like [`CniNode::start`], with the daemon installing our eBPF capture for each ambient
    /// pod (`--ebpf-capture`) for a node agent running in `proxy_cgroup` (e.g. Istio's
    /// ztunnel): pins under `<bpffs>/<prefix>-node<n>-cni`, node probes from the gateway,
    /// outbound port [`EXCLUDED_OUTBOUND_PORT`] and inbound port [`EXCLUDED_INBOUND_PORT`]
    /// never captured.
    pub fn start_with_capture(
        cluster: &Cluster,
        node: usize,
        cp: &ControlPlaneAccess,
        proxy_cgroup: &Path,
    ) -> Result<Self> {
        crate::mesh::ensure_bpffs()?;
        let n = cluster.node(node);
        let capture = ztunnel::cni::capture::CniCaptureConfig {
            capture: ztunnel::redirect::CaptureConfig {
                pin_dir: PathBuf::from(crate::mesh::BPFFS).join(format!("{}-node{node}-cni", cluster.prefix())),
                cgroup: crate::cgroup2_root()?.to_path_buf(),
                exclusions: ztunnel::redirect::Exclusions {
                    probe_sources: vec![n.gateway4().into(), n.gateway6().into()],
                    outbound_ports: vec![EXCLUDED_OUTBOUND_PORT],
                    inbound_ports: vec![EXCLUDED_INBOUND_PORT],
                    ..Default::default()
                },
                max_pods: ztunnel::redirect::DEFAULT_MAX_PODS,
                for_foreign_proxy: true,
                sockmap_shortcut: crate::mesh::sockmap_shortcut(),
                shortcut_max_sockets: ztunnel::redirect::DEFAULT_SHORTCUT_MAX_SOCKETS,
            },
            proxy_cgroups: vec![proxy_cgroup.to_path_buf()],
        };
        Self::start_full(cluster, node, cp, Some(capture))
    }

    fn start_full(
        cluster: &Cluster,
        node: usize,
        cp: &ControlPlaneAccess,
        capture: Option<ztunnel::cni::capture::CniCaptureConfig>,
    ) -> Result<Self> {
        let n = cluster.node(node);
        let node_name = cp.node_name(node, n.name());
        let dir = PathBuf::from(RUN_DIR).join(format!("{}-node{node}-cni", cluster.prefix()));
        let cfg = CniConfig {
            zds_socket: dir.join("ztunnel.sock"),
            plugin_socket: dir.join("plugin.sock"),
            state_dir: dir.join("pods"),
            xds: ztunnel::xds::XdsConfig {
                server: cp.endpoint(&node_name),
                node_name,
                cluster_id: "Kubernetes".into(),
            },
            enroll_wait: Duration::from_secs(5),
            capture,
        };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let plugin = PluginBin::new(&dir.join("bin"))?;
        let daemon = rt.block_on(CniDaemon::start(cfg.clone())).context("starting ztunnel cni")?;
        Ok(Self { rt, daemon: Some(daemon), cfg, dir, plugin })
    }

    /// The ZDS socket the node agent connects to.
    pub fn zds_socket(&self) -> &Path {
        &self.cfg.zds_socket
    }

    /// The socket the plugin reports pods on.
    pub fn plugin_socket(&self) -> &Path {
        &self.cfg.plugin_socket
    }

    /// The daemon's current view.
    pub fn status(&self) -> CniStatus {
        self.daemon.as_ref().expect("cni daemon running").status()
    }

    /// Waits up to `timeout` for the daemon's view to satisfy `pred`.
    pub fn wait(&self, timeout: Duration, pred: impl Fn(&CniStatus) -> bool) -> Result<CniStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("cni daemon did not reach the expected state in {timeout:?}: {s:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Counters of the eBPF capture the daemon installed (`start_with_capture`).
    pub fn capture_counters(&self) -> Result<ztunnel::redirect::CounterSnapshot> {
        let daemon = self.daemon.as_ref().context("cni daemon not running")?;
        let capture = daemon.capture().context("the daemon installs no capture")?;
        Ok(capture.counters()?)
    }

    /// Stops the daemon as a crash would (its pod records stay).
    pub fn stop(&mut self) {
        drop(self.daemon.take());
        // Let the runtime's aborted tasks close their sockets.
        std::thread::sleep(Duration::from_millis(50));
    }

    /// Starts a new daemon on the same sockets and records after [`CniNode::stop`].
    pub fn start_again(&mut self) -> Result<()> {
        if self.daemon.is_some() {
            bail!("cni daemon already running");
        }
        self.daemon = Some(self.rt.block_on(CniDaemon::start(self.cfg.clone())).context("restarting ztunnel cni")?);
        Ok(())
    }

    /// Runs the plugin for `pod` with `command` (ADD, DEL, CHECK), as the runtime would for
    /// its sandbox: CNI_NETNS is the pod's named netns, CNI_ARGS carries its Kubernetes names.
    pub fn plugin(&self, command: &str, pod: &Pod) -> PluginRun {
        self.plugin_in(command, pod, "default")
    }

    /// [`CniNode::plugin`] for a pod of `namespace`.
    pub fn plugin_in(&self, command: &str, pod: &Pod, namespace: &str) -> PluginRun {
        let config = plugin_config(self.plugin_socket(), Some(prev_result(pod)));
        self.plugin.run(&pod_env_in(command, pod, namespace), &config)
    }
}

impl Drop for CniNode {
    fn drop(&mut self) {
        self.stop();
        if let Some(c) = &self.cfg.capture {
            let _ = ztunnel::redirect::remove_pinned(&c.capture.pin_dir);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The CNI environment a runtime gives the plugin for `pod`'s sandbox.
pub fn pod_env(command: &str, pod: &Pod) -> Vec<(String, String)> {
    pod_env_in(command, pod, "default")
}

/// [`pod_env`] for a pod of `namespace`.
pub fn pod_env_in(command: &str, pod: &Pod, namespace: &str) -> Vec<(String, String)> {
    let netns = crate::netns::netns_path(pod.netns_name());
    vec![
        ("CNI_COMMAND".into(), command.into()),
        ("CNI_CONTAINERID".into(), container_id(pod)),
        ("CNI_NETNS".into(), netns.display().to_string()),
        ("CNI_IFNAME".into(), "eth0".into()),
        (
            "CNI_ARGS".into(),
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                pod.name(),
                container_id(pod),
                pod.uid()
            ),
        ),
        ("CNI_PATH".into(), "/opt/cni/bin".into()),
    ]
}

/// The sandbox id a runtime would give `pod`.
pub fn container_id(pod: &Pod) -> String {
    format!("sandbox-{}", pod.uid())
}

/// What the main plugin (before ours in the chain) reported for `pod`.
pub fn prev_result(pod: &Pod) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": crate::netns::netns_path(pod.netns_name())}],
        "ips": [
            {"address": format!("{}/24", pod.ip4()), "interface": 0},
            {"address": format!("{}/64", pod.ip6()), "interface": 0}
        ],
        "dns": {}
    })
}

/// A chained network config naming our plugin and its daemon socket.
pub fn plugin_config(daemon_socket: &Path, prev: Option<Value>) -> String {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "ztunnel-cni",
        "daemonSocket": daemon_socket,
    });
    if let Some(prev) = prev {
        conf["prevResult"] = prev;
    }
    conf.to_string()
}

/// One plugin run: what it printed and how it exited.
#[derive(Debug, Clone)]
pub struct PluginRun {
    pub stdout: String,
    pub stderr: String,
    /// Exit code (`None` when killed by a signal, e.g. a panic with abort).
    pub code: Option<i32>,
}

impl PluginRun {
    /// Stdout as JSON (panics with the output when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// The `ztunnel` binary installed under the plugin's name in a directory of its own, as
/// in a runtime's CNI bin directory. Dropping it removes the directory.
pub struct PluginBin {
    dir: PathBuf,
}

impl PluginBin {
    /// Links `dir/ztunnel-cni` to the test build's `ztunnel` binary.
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let link = dir.join(ztunnel::cni::plugin::PLUGIN_NAME);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(crate::agent_process::ztunnel_binary(), &link)
            .with_context(|| format!("linking {}", link.display()))?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// A fresh directory for a test that needs the plugin without a daemon.
    pub fn scratch() -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("zt{}x{}-plugin", std::process::id(), 1_000_000 + N.fetch_add(1, Ordering::Relaxed));
        Self::new(&PathBuf::from(RUN_DIR).join(name))
    }

    /// Runs the plugin with exactly `env` (nothing inherited) and `stdin`.
    pub fn run(&self, env: &[(String, String)], stdin: &str) -> PluginRun {
        use std::io::Write;
        let mut child = Command::new(self.dir.join(ztunnel::cni::plugin::PLUGIN_NAME))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the plugin");
        child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("writing the config");
        let out = child.wait_with_output().expect("waiting for the plugin");
        PluginRun {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            code: out.status.code(),
        }
    }
}

impl Drop for PluginBin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A ZDS socket served by the test itself (playing istio-cni): node agents connect here.
/// Dropping it removes the socket file.
pub struct ZdsListener {
    fd: OwnedFd,
    path: PathBuf,
}

impl ZdsListener {
    /// Binds an owner-only `SOCK_SEQPACKET` listener at `path`.
    pub fn bind(path: &Path) -> Result<Self> {
        let fd = ztunnel::enrollment::socket::bind(path).with_context(|| format!("binding {}", path.display()))?;
        Ok(Self { fd, path: path.to_path_buf() })
    }

    /// Waits up to `timeout` for an agent, reads its first datagram as the hello, and
    /// returns the hello and a sender of requests on that connection.
    pub fn accept(&self, timeout: Duration) -> Result<(ZdsHello, EnrollmentClient)> {
        use nix::sys::socket::{accept4, setsockopt, sockopt, SockFlag};
        let deadline = Instant::now() + timeout;
        let raw = loop {
            match accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(raw) => break raw,
                Err(nix::Error::EAGAIN) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => bail!("no node agent connected to {} in {timeout:?}: {e}", self.path.display()),
            }
        };
        // SAFETY: accept4 returned a new fd that we now own (blocking: no SOCK_NONBLOCK).
        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
        let t = nix::sys::time::TimeVal::new(5, 0);
        setsockopt(&conn, sockopt::ReceiveTimeout, &t)?;
        let first = recv_datagram(conn.as_raw_fd()).map_err(|e| anyhow!("reading the agent's hello: {e}"))?;
        let hello = ZdsHello::decode(first.bytes.as_slice()).context("the first datagram is not a ZdsHello")?;
        Ok((hello, EnrollmentClient::from_fd(conn)))
    }
}

impl Drop for ZdsListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir(dir); // only when empty
        }
    }
}
