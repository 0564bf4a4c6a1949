//! Running a real `ztunnel node` agent (in-process, on its own tokio runtime) for one
//! node of a mini-cluster, and enrolling pods into it the way the CNI plugin would.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::broadcast;
use ztunnel::admin::AdminConfig;
use ztunnel::enrollment::{EnrollmentClient, WorkloadInfo};
use ztunnel::identity::{CaConfig, InProcessCa};
use ztunnel::node::{Node as Agent, NodeConfig};
use ztunnel::proxy::ConnectionRecord;
use ztunnel::redirect::{bpffs_mounted, CaptureConfig, CounterSnapshot, Exclusions};

use crate::{Cluster, InNetns, Pod};

/// Trust domain of every test mesh.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Where a cluster's mesh root CA is kept (shared by its node agents).
pub fn ca_dir(cluster: &Cluster) -> PathBuf {
    PathBuf::from(RUN_DIR).join(format!("{}-ca", cluster.prefix()))
}

/// The cluster's local-config file (`{workloads, services, policies}`), watched by agents.
pub fn mesh_config_path(cluster: &Cluster) -> PathBuf {
    PathBuf::from(RUN_DIR).join(format!("{}-mesh.yaml", cluster.prefix()))
}

/// Writes the cluster's local config and waits until every given agent has applied it.
pub fn write_mesh_config(cluster: &Cluster, yaml: &str, agents: &[&MeshNode]) -> Result<()> {
    let path = mesh_config_path(cluster);
    let versions: Vec<u64> = agents.iter().map(|a| *a.agent().state().subscribe().borrow()).collect();
    std::fs::create_dir_all(path.parent().expect("parent"))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml)?;
    std::fs::rename(&tmp, &path)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for (a, v) in agents.iter().zip(versions) {
        while *a.agent().state().subscribe().borrow() == v {
            if std::time::Instant::now() > deadline {
                bail!("agent did not apply {}", path.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// A local-config `workloads` entry for a pod in the mesh (HBONE).
pub fn workload_yaml(pod: &Pod, namespace: &str, service_account: &str, extra: &str) -> String {
    format!(
        "- uid: {uid}\n  name: {name}\n  namespace: {namespace}\n  serviceAccount: {service_account}\n  workloadIps: [\"{ip4}\", \"{ip6}\"]\n  protocol: HBONE\n{extra}",
        uid = pod.uid(),
        name = pod.name(),
        ip4 = pod.ip4(),
        ip6 = pod.ip6(),
    )
}

/// How a test's node agents reach its control plane: address, root, one token per node.
#[derive(Debug, Clone)]
pub struct ControlPlaneAccess {
    pub address: std::net::SocketAddr,
    pub root_pem: String,
    pub tokens_dir: PathBuf,
    /// The name each cluster node has in the control plane's YAML (index = node); the
    /// cluster's own node names when empty.
    pub node_names: Vec<String>,
}

impl ControlPlaneAccess {
    /// The control plane's name for cluster node `index` (default: `default`).
    pub fn node_name(&self, index: usize, default: &str) -> String {
        self.node_names.get(index).cloned().unwrap_or_else(|| default.to_string())
    }

    /// The endpoint as node `node` uses it (its own token file).
    pub fn endpoint(&self, node: &str) -> ztunnel::grpc::ControlPlaneEndpoint {
        ztunnel::grpc::ControlPlaneEndpoint {
            address: format!("https://{}", self.address),
            root_pem: Some(self.root_pem.clone().into_bytes()),
            server_name: Some("localhost".into()),
            token_path: Some(self.tokens_dir.join(node)),
        }
    }
}

/// Where an agent's state and pods come from besides its own defaults.
#[derive(Default)]
struct Sources<'a> {
    /// xDS and CA from this control plane (else local config and the cluster CA).
    control_plane: Option<&'a ControlPlaneAccess>,
    /// Connect to this ZDS socket (else serve the enrollment socket).
    zds_connect: Option<PathBuf>,
    /// Sign with Istio plug-in CA files from this directory (else the cluster CA).
    plugin_ca: Option<PathBuf>,
    /// Apps see clients' own addresses.
    keep_source: bool,
    /// A span per connection, exported here.
    connection_spans: Option<ztunnel::spans::TraceConfig>,
    /// Force the same-node fast path on or off (else [`same_node_fast_path`] decides).
    fast_path: Option<bool>,
    /// Force the sockmap shortcut on, tracking at most this many sockets (else
    /// [`sockmap_shortcut`] decides, at the default size).
    shortcut_max_sockets: Option<u32>,
}

/// Whether test agents (and the test CNI's capture) splice the in-pod loopback legs with
/// the sockmap shortcut: when `ZTUNNEL_SOCKMAP_SHORTCUT=true` (the flag's own variable,
/// which agent processes read too), so CI runs the capture, HBONE, policy and interop tests
/// in both modes.
pub fn sockmap_shortcut() -> bool {
    matches!(std::env::var("ZTUNNEL_SOCKMAP_SHORTCUT").as_deref(), Ok("true" | "1" | "on"))
}

/// How many links the sockmap shortcut adds to an agent's (its sock_ops and sk_msg links).
pub fn shortcut_links() -> usize {
    if sockmap_shortcut() {
        2
    } else {
        0
    }
}

/// Whether test agents send connections between their own pods through the in-process
/// fast path: only with `ZTUNNEL_SAME_NODE_FAST_PATH=true` (the `ztunnel node` flag's own
/// variable, which agent processes read too; off by default like the flag), so CI runs the
/// same tests both ways.
pub fn same_node_fast_path() -> bool {
    matches!(std::env::var("ZTUNNEL_SAME_NODE_FAST_PATH").as_deref(), Ok("true" | "1" | "on"))
}

/// bpffs mount point used for all pins.
pub const BPFFS: &str = "/sys/fs/bpf";

/// A node agent serving one node of a cluster. Dropping it uninstalls everything.
pub struct MeshNode {
    rt: tokio::runtime::Runtime,
    agent: Option<Agent>,
    cfg: NodeConfig,
}

/// Mounts bpffs if needed (setup normally does this); fails loudly when it cannot.
pub fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted(Path::new(BPFFS)) {
        return Ok(());
    }
    crate::cmd::run("mount", &["-t", "bpf", "bpf", BPFFS]).context("mounting bpffs (are you root?)")?;
    Ok(())
}

impl MeshNode {
    /// Starts an agent for `cluster.node(node)`; probes come from the node's bridge address.
    pub fn start(cluster: &Cluster, node: usize, exclusions: Exclusions) -> Result<Self> {
        Self::start_in(cluster, node, exclusions, TRUST_DOMAIN)
    }

    /// Like [`MeshNode::start`], with the agent (and the cluster CA) in `trust_domain`.
    pub fn start_in(cluster: &Cluster, node: usize, exclusions: Exclusions, trust_domain: &str) -> Result<Self> {
        Self::start_with(cluster, node, exclusions, trust_domain, Default::default())
    }

    /// Like [`MeshNode::start`], with per-pod connection caps.
    pub fn start_limited(cluster: &Cluster, node: usize, limits: ztunnel::proxy::limit::Limits) -> Result<Self> {
        Self::start_with(cluster, node, Exclusions::default(), TRUST_DOMAIN, limits)
    }

    /// Like [`MeshNode::start`], with kernel maps sized for `max_pods` pods.
    pub fn start_with_max_pods(cluster: &Cluster, node: usize, max_pods: u32) -> Result<Self> {
        Self::start_full(cluster, node, Exclusions::default(), TRUST_DOMAIN, Default::default(), max_pods)
    }

    fn start_with(
        cluster: &Cluster,
        node: usize,
        exclusions: Exclusions,
        trust_domain: &str,
        limits: ztunnel::proxy::limit::Limits,
    ) -> Result<Self> {
        let max_pods = ztunnel::redirect::DEFAULT_MAX_PODS;
        Self::start_full(cluster, node, exclusions, trust_domain, limits, max_pods)
    }

    /// Starts an agent that takes its state from a control plane over xDS and its
    /// certificates from that control plane's CA (no local config).
    pub fn start_with_control_plane(cluster: &Cluster, node: usize, cp: &ControlPlaneAccess) -> Result<Self> {
        let limits = ztunnel::proxy::limit::Limits::default();
        let sources = Sources { control_plane: Some(cp), ..Default::default() };
        Self::start_full_with(cluster, node, Exclusions::default(), "cluster.local", limits, 0, sources)
    }

    /// Like [`MeshNode::start`], with the agent's in-process CA signing from Istio plug-in CA
    /// files in `plugin_dir` (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`)
    /// instead of the cluster's generated root: e.g. the root Istio's ztunnel uses under
    /// `FAKE_CA`, so the two meshes trust each other.
    pub fn start_with_plugin_ca(cluster: &Cluster, node: usize, plugin_dir: &Path) -> Result<Self> {
        let limits = ztunnel::proxy::limit::Limits::default();
        let sources = Sources { plugin_ca: Some(plugin_dir.to_path_buf()), ..Default::default() };
        Self::start_full_with(cluster, node, Exclusions::default(), TRUST_DOMAIN, limits, 0, sources)
    }

    /// Like [`MeshNode::start`], with apps seeing clients' own addresses (`ENABLE_ORIG_SRC`),
    /// as the `ztunnel node` binary does by default.
    pub fn start_keeping_source(cluster: &Cluster, node: usize) -> Result<Self> {
        let limits = ztunnel::proxy::limit::Limits::default();
        let sources = Sources { keep_source: true, ..Default::default() };
        Self::start_full_with(cluster, node, Exclusions::default(), TRUST_DOMAIN, limits, 0, sources)
    }

    /// Like [`MeshNode::start`], with connections between this agent's own pods always
    /// taking HBONE (the same-node fast path off).
    pub fn start_without_fast_path(cluster: &Cluster, node: usize) -> Result<Self> {
        let limits = ztunnel::proxy::limit::Limits::default();
        let sources = Sources { fast_path: Some(false), ..Default::default() };
        Self::start_full_with(cluster, node, Exclusions::default(), TRUST_DOMAIN, limits, 0, sources)
    }

    /// Like [`MeshNode::start`], with the same-node fast path on whatever the environment says.
    pub fn start_with_fast_path(cluster: &Cluster, node: usize) -> Result<Self> {
        let limits = ztunnel::proxy::limit::Limits::default();
        let sources = Sources { fast_path: Some(true), ..Default::default() };
        Self::start_full_with(cluster, node, Exclusions::default(), TRUST_DOMAIN, limits, 0, sources)
    }

    /// Like [`MeshNode::start`], with the sockmap shortcut on whatever the environment says,
    /// its maps sized for `max_sockets` sockets.
    pub fn start_with_shortcut(cluster: &Cluster, node: usize, max_sockets: u32) -> Result<Self> {
        let limits = ztunnel::proxy::limit::Limits::default();
        let sources = Sources { shortcut_max_sockets: Some(max_sockets), ..Default::default() };
        Self::start_full_with(cluster, node, Exclusions::default(), TRUST_DOMAIN, limits, 0, sources)
    }

    /// Like [`MeshNode::start`], with a span per proxied connection exported over OTLP/HTTP to
    /// `endpoint` (every new trace sampled).
    pub fn start_with_connection_spans(cluster: &Cluster, node: usize, endpoint: &str) -> Result<Self> {
        let limits = ztunnel::proxy::limit::Limits::default();
        let spans = ztunnel::spans::TraceConfig {
            endpoint: endpoint.into(),
            service_name: "ztunnel".into(),
            sampling: 1.0,
            export_delay: std::time::Duration::from_millis(100),
        };
        let sources = Sources { connection_spans: Some(spans), ..Default::default() };
        Self::start_full_with(cluster, node, Exclusions::default(), TRUST_DOMAIN, limits, 0, sources)
    }

    /// Starts an agent in Istio's direction of enrollment: it serves no socket and connects
    /// to the ZDS socket at `zds` (retrying until something serves it). Its state comes from
    /// `cp` when given, else from the cluster's local config.
    pub fn start_connecting(
        cluster: &Cluster,
        node: usize,
        zds: &Path,
        cp: Option<&ControlPlaneAccess>,
    ) -> Result<Self> {
        let limits = ztunnel::proxy::limit::Limits::default();
        let sources = Sources { control_plane: cp, zds_connect: Some(zds.to_path_buf()), ..Default::default() };
        Self::start_full_with(cluster, node, Exclusions::default(), TRUST_DOMAIN, limits, 0, sources)
    }

    fn start_full(
        cluster: &Cluster,
        node: usize,
        exclusions: Exclusions,
        trust_domain: &str,
        limits: ztunnel::proxy::limit::Limits,
        max_pods: u32,
    ) -> Result<Self> {
        Self::start_full_with(cluster, node, exclusions, trust_domain, limits, max_pods, Sources::default())
    }

    fn start_full_with(
        cluster: &Cluster,
        node: usize,
        mut exclusions: Exclusions,
        trust_domain: &str,
        limits: ztunnel::proxy::limit::Limits,
        max_pods: u32,
        sources: Sources<'_>,
    ) -> Result<Self> {
        let cp = sources.control_plane;
        let max_pods = if max_pods == 0 { ztunnel::redirect::DEFAULT_MAX_PODS } else { max_pods };
        ensure_bpffs()?;
        let n = cluster.node(node);
        exclusions.probe_sources.push(n.gateway4().into());
        exclusions.probe_sources.push(n.gateway6().into());
        let name = format!("{}-node{node}", cluster.prefix());
        let run_dir = PathBuf::from(RUN_DIR).join(&name);
        let mut ca = CaConfig::new(trust_domain);
        match &sources.plugin_ca {
            Some(dir) => ca.plugin_dir = Some(dir.clone()),
            None => ca.state_dir = Some(ca_dir(cluster)),
        }
        let cp_node = cp.map(|cp| cp.node_name(node, n.name())).unwrap_or_default();
        let ca: std::sync::Arc<dyn ztunnel::identity::CertificateProvider> = match cp {
            Some(cp) => std::sync::Arc::new(ztunnel::identity::RemoteCa::new(
                cp.endpoint(&cp_node),
                None,
                ztunnel::identity::DEFAULT_LEAF_TTL,
            )),
            None => std::sync::Arc::new(InProcessCa::new(ca).context("cluster CA")?),
        };
        let cfg = NodeConfig {
            enrollment_socket: run_dir.join("ztunnel.sock"),
            zds_connect: sources.zds_connect,
            state_dir: run_dir.join("pods"),
            trust_domain: trust_domain.into(),
            ca,
            local_config: if cp.is_some() { None } else { Some(mesh_config_path(cluster)) },
            xds: cp.map(|cp| ztunnel::xds::XdsConfig {
                server: cp.endpoint(&cp_node),
                node_name: cp_node.clone(),
                cluster_id: "Kubernetes".into(),
            }),
            log_control: None,
            keep_source: sources.keep_source,
            connection_spans: sources.connection_spans,
            same_node_fast_path: sources.fast_path.unwrap_or_else(same_node_fast_path),
            limits,
            handoff_socket: Some(run_dir.join("handoff.sock")),
            admin: Some(AdminConfig {
                admin_addr: "127.0.0.1:0".parse().expect("addr"),
                metrics_addr: "127.0.0.1:0".parse().expect("addr"),
                readiness_addr: "127.0.0.1:0".parse().expect("addr"),
            }),
            capture: CaptureConfig {
                pin_dir: PathBuf::from(BPFFS).join(&name),
                cgroup: crate::cgroup2_root()?.to_path_buf(),
                exclusions,
                max_pods,
                for_foreign_proxy: false,
                sockmap_shortcut: sockmap_shortcut() || sources.shortcut_max_sockets.is_some(),
                shortcut_max_sockets: sources
                    .shortcut_max_sockets
                    .unwrap_or(ztunnel::redirect::DEFAULT_SHORTCUT_MAX_SOCKETS),
            },
        };
        // The agent refuses to start without its config file: begin with an empty mesh.
        let config = mesh_config_path(cluster);
        if !config.exists() {
            std::fs::create_dir_all(config.parent().expect("parent"))?;
            std::fs::write(&config, "workloads: []\n")?;
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let agent = rt.block_on(Agent::start(cfg.clone())).context("starting node agent")?;
        Ok(Self { rt, agent: Some(agent), cfg })
    }

    /// The in-process agent.
    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent running")
    }

    /// A fresh enrollment connection (what the CNI plugin holds).
    pub fn client(&self) -> Result<EnrollmentClient> {
        EnrollmentClient::connect(&self.cfg.enrollment_socket).map_err(|e| anyhow!("connecting to agent: {e}"))
    }

    /// Enrolls a pod; an error ack becomes an error.
    pub fn enroll(&self, pod: &Pod) -> Result<()> {
        self.enroll_as(pod, "default", pod.name())
    }

    /// Enrolls a pod with a given namespace and service account (its SPIFFE identity).
    pub fn enroll_as(&self, pod: &Pod, namespace: &str, service_account: &str) -> Result<()> {
        enroll_at(&self.cfg.enrollment_socket, pod, namespace, service_account)
    }

    /// Removes a pod; an error ack becomes an error.
    pub fn remove(&self, pod: &Pod) -> Result<()> {
        self.client()?.del(pod.uid())?.map_err(|e| anyhow!("agent refused Del {}: {e}", pod.uid()))
    }

    /// Kernel counters of this agent's programs.
    pub fn counters(&self) -> CounterSnapshot {
        self.agent().capture().counters().expect("reading counters")
    }

    /// Connection records published by this agent from now on.
    pub fn events(&self) -> broadcast::Receiver<ConnectionRecord> {
        self.agent().connection_events()
    }

    /// Kernel ids of this agent's pinned links.
    pub fn link_ids(&self) -> Vec<u32> {
        self.agent().capture().link_ids()
    }

    /// The agent's enrollment socket.
    pub fn enrollment_socket(&self) -> &Path {
        &self.cfg.enrollment_socket
    }

    /// The agent's pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.cfg.capture.pin_dir
    }

    /// Stops the agent as a crash would (capture stays pinned) and starts a new one on
    /// the same pins and state.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_agent();
        self.start_again()
    }

    /// Stops the agent as a crash would (capture stays pinned, pod listeners close).
    pub fn stop_agent(&mut self) {
        drop(self.agent.take());
        // Aborted tasks are dropped, and their sockets closed, by the runtime's workers: wait until none is left
        // (a fixed 50 ms was too short on a loaded CI machine, and the pods' listener ports were still taken).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.rt.metrics().num_alive_tasks() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts a new agent on the same pins, state and config after [`MeshNode::stop_agent`].
    pub fn start_again(&mut self) -> Result<()> {
        if self.agent.is_some() {
            bail!("agent already running");
        }
        let agent = self.rt.block_on(Agent::start(self.cfg.clone())).context("restarting agent")?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Removes everything (as `ztunnel node --uninstall`).
    pub fn uninstall(&mut self) -> Result<()> {
        match self.agent.take() {
            Some(a) => {
                let _guard = self.rt.enter();
                a.uninstall().map_err(|e| anyhow!("uninstall: {e}"))?;
            }
            None => bail!("agent not running"),
        }
        let _ = std::fs::remove_dir_all(self.cfg.enrollment_socket.parent().unwrap_or(Path::new("/nonexistent")));
        if let Some(cfg) = &self.cfg.local_config {
            let _ = std::fs::remove_file(cfg);
            let _ = std::fs::remove_dir_all(
                cfg.with_file_name(cfg.file_name().and_then(|n| n.to_str()).unwrap_or("").replace("-mesh.yaml", "-ca")),
            );
        }
        Ok(())
    }
}

impl Drop for MeshNode {
    fn drop(&mut self) {
        if self.agent.is_some() {
            if let Err(e) = self.uninstall() {
                eprintln!("cleanup of {}: {e}", self.cfg.capture.pin_dir.display());
            }
        }
    }
}

/// Hands `pod` to the agent listening on `socket`, as the CNI plugin would; an error ack
/// becomes an error.
pub fn enroll_at(socket: &Path, pod: &Pod, namespace: &str, service_account: &str) -> Result<()> {
    let info =
        WorkloadInfo { name: pod.name().into(), namespace: namespace.into(), service_account: service_account.into() };
    EnrollmentClient::connect(socket)
        .map_err(|e| anyhow!("connecting to agent: {e}"))?
        .add(pod.uid(), info, pod.netns_file())?
        .map_err(|e| anyhow!("agent refused {}: {e}", pod.uid()))
}

/// Ids of every BPF link the kernel holds (its own listing).
pub fn kernel_link_ids() -> Vec<u32> {
    aya::programs::loaded_links().filter_map(|l| l.ok()).map(|l| l.id()).collect()
}

/// Waits up to `timeout` for a record matching `pred`.
pub fn wait_record(
    rx: &mut broadcast::Receiver<ConnectionRecord>,
    timeout: Duration,
    pred: impl Fn(&ConnectionRecord) -> bool,
) -> Option<ConnectionRecord> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        match rx.try_recv() {
            Ok(r) if pred(&r) => return Some(r),
            Ok(_) => {}
            Err(broadcast::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(10)),
            Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(broadcast::error::TryRecvError::Closed) => return None,
        }
    }
    None
}

/// Removes pins and run files left by agents of test processes that no longer exist.
pub fn sweep_pins() {
    let dead = |name: &str| {
        name.strip_prefix("zt")
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    for entry in std::fs::read_dir(BPFFS).into_iter().flatten().flatten() {
        if dead(&entry.file_name().to_string_lossy()) {
            let _ = ztunnel::redirect::remove_pinned(&entry.path());
        }
    }
    for entry in std::fs::read_dir(RUN_DIR).into_iter().flatten().flatten() {
        if dead(&entry.file_name().to_string_lossy()) {
            let _ = std::fs::remove_dir_all(entry.path()).or_else(|_| std::fs::remove_file(entry.path()));
        }
    }
}

/// Where test agents keep sockets, pod state, CA roots and local configs.
pub const RUN_DIR: &str = "/run/ztunnel-test";

/// One HBONE CONNECT from inside `from` (a pod or node namespace), authenticated as `src_identity` with a certificate
/// of the cluster's own CA, to the HBONE server at `hbone_ip` (which must prove
/// `dst_identity`) for `target`, with `forwarded` as the `forwarded` header: what a
/// misbehaving or forging mesh member can send. `Err` carries the refusal.
pub fn hbone_connect(
    cluster: &Cluster,
    from: &impl InNetns,
    src_identity: &str,
    dst_identity: &str,
    hbone_ip: std::net::IpAddr,
    target: std::net::SocketAddr,
    forwarded: std::net::SocketAddr,
) -> std::result::Result<(), String> {
    use std::sync::Arc;
    use ztunnel::hbone::{CertManagerTls, ConnectHeaders, ConnectionPool, PoolConfig, PoolKey, TcpDialer};
    use ztunnel::identity::{CertManager, CertManagerConfig, Identity};
    let mut cfg = CaConfig::new(TRUST_DOMAIN);
    cfg.state_dir = Some(ca_dir(cluster));
    let ca = Arc::new(InProcessCa::new(cfg).map_err(|e| e.to_string())?);
    let src: Identity = src_identity.parse().map_err(|e| format!("{e}"))?;
    let dst: Identity = dst_identity.parse().map_err(|e| format!("{e}"))?;
    from.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let certs = CertManager::new(ca, CertManagerConfig::default());
            let pool =
                ConnectionPool::new(PoolConfig::default(), Arc::new(TcpDialer), Arc::new(CertManagerTls { certs }));
            let key = PoolKey {
                src_identity: src,
                dst_identity: dst,
                dst_alt_identities: vec![],
                dst: std::net::SocketAddr::new(hbone_ip, 15008),
                src_ip: forwarded.ip(),
            };
            let headers = ConnectHeaders { forwarded_for: Some(forwarded), ..Default::default() };
            pool.connect(key, target, headers).await.map(|_| ()).map_err(|e| e.to_string())
        })
    })
}
