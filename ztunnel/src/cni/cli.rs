//! The `ztunnel cni` subcommand's flags and entry points, here rather than in `main.rs` so
//! the binary stays wiring only: `ztunnel cni` runs the daemon, `ztunnel cni plugin` the
//! CNI plugin (which a runtime normally runs as `ztunnel-cni`, see [`super::plugin`]).
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::{CniConfig, CniDaemon, DEFAULT_PLUGIN_SOCKET};

/// `ztunnel cni [plugin]`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CniArgs {
    #[command(subcommand)]
    pub command: Option<CniCommand>,
    /// ZDS socket node agents connect to (Istio's `INPOD_UDS`).
    #[arg(long, env = "INPOD_UDS", default_value = "/var/run/ztunnel/ztunnel.sock")]
    pub inpod_uds: PathBuf,
    /// Socket the CNI plugin reports pods on (the plugin config's `daemonSocket`).
    #[arg(long, env = "ZTUNNEL_CNI_PLUGIN_SOCKET", default_value = DEFAULT_PLUGIN_SOCKET)]
    pub plugin_socket: PathBuf,
    /// Pod records kept across restarts.
    #[arg(long, env = "ZTUNNEL_CNI_STATE_DIR", default_value = "/var/run/ztunnel/cni")]
    pub state_dir: PathBuf,
    /// Control plane serving delta ADS (istiod or `ztunnel controller`); says which pods
    /// are in the mesh.
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// PEM roots for the xDS server's certificate.
    #[arg(long, env = "XDS_ROOT_CA")]
    pub xds_root_ca: Option<PathBuf>,
    /// File with the bearer token sent to the xDS server.
    #[arg(long, env = "AUTH_TOKEN")]
    pub auth_token: Option<PathBuf>,
    /// Name expected in the control plane's certificate (default: the address's host).
    #[arg(long, env = "ZTUNNEL_CONTROL_PLANE_SERVER_NAME")]
    pub control_plane_server_name: Option<String>,
    /// This node's name: only pods the control plane schedules here are enrolled.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// Cluster id, sent to the control plane.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// How long (ms) a plugin ADD waits for the control plane to know the pod and the node
    /// agent to enroll it.
    #[arg(long, env = "ZTUNNEL_CNI_ENROLL_WAIT_MS", default_value_t = 5000)]
    pub enroll_wait_ms: u64,
    /// Install the chained plugin at start: this binary is copied here as `ztunnel-cni`
    /// (the host's `/opt/cni/bin`, mounted into the container).
    #[arg(long, requires = "cni_conf_dir")]
    pub cni_bin_dir: Option<PathBuf>,
    /// The host's network configurations (`/etc/cni/net.d`): the plugin is appended to the
    /// chain of the first conflist (or `--cni-conf-name`).
    #[arg(long, requires = "cni_bin_dir")]
    pub cni_conf_dir: Option<PathBuf>,
    /// The conflist to chain into (default: the first by name).
    #[arg(long)]
    pub cni_conf_name: Option<String>,
    /// The daemon socket path as the runtime's plugin sees it on the host (default: the
    /// `--plugin-socket` path).
    #[arg(long)]
    pub host_plugin_socket: Option<PathBuf>,
    /// Capture each ambient pod's traffic with our eBPF programs before handing it to the
    /// node agent, for an agent that brings no capture of its own (Istio's ztunnel, in place
    /// of istio-cni's iptables rules).
    #[arg(long, requires = "proxy_cgroup")]
    pub ebpf_capture: bool,
    /// With `--ebpf-capture`: splice the in-pod loopback legs with the sockmap shortcut
    /// (any proxy's, since it pairs sockets by address), as `ztunnel node --sockmap-shortcut`.
    #[arg(long, env = "ZTUNNEL_SOCKMAP_SHORTCUT", default_value_t = false, action = clap::ArgAction::Set)]
    pub sockmap_shortcut: bool,
    /// cgroup v2 directory of the node agent's processes (repeatable): their marked
    /// connects are not captured and their in-pod 15006 listeners receive inbound traffic.
    #[arg(long = "proxy-cgroup")]
    pub proxy_cgroup: Vec<PathBuf>,
    /// Pin directory on bpffs for `--ebpf-capture`.
    #[arg(long, default_value = "/sys/fs/bpf/ztunnel-cni")]
    pub pin_dir: PathBuf,
    /// Outbound destination port never captured (repeatable; `--ebpf-capture`).
    #[arg(long = "exclude-outbound-port")]
    pub exclude_outbound_ports: Vec<u16>,
    /// Inbound pod port never captured (repeatable; `--ebpf-capture`).
    #[arg(long = "exclude-inbound-port")]
    pub exclude_inbound_ports: Vec<u16>,
    /// Source address of node health probes; reaches apps directly (repeatable; `--ebpf-capture`).
    #[arg(long = "probe-source", default_value = "169.254.7.127")]
    pub probe_sources: Vec<std::net::IpAddr>,
}

/// `ztunnel cni plugin`.
#[derive(Debug, clap::Subcommand)]
pub enum CniCommand {
    /// Run as the chained CNI plugin: CNI_* environment and network config on stdin, as a
    /// container runtime calls it.
    Plugin,
}

impl CniArgs {
    /// Whether to run as the plugin (which must not log to stdout).
    pub fn is_plugin(&self) -> bool {
        matches!(self.command, Some(CniCommand::Plugin))
    }

    /// The daemon's config from the flags.
    pub fn config(&self) -> anyhow::Result<CniConfig> {
        let address = self
            .xds_address
            .clone()
            .context("XDS_ADDRESS (--xds-address) is required: it says which pods are in the mesh")?;
        let root_pem = match &self.xds_root_ca {
            Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
            None => None,
        };
        let node_name = crate::grpc::node_name(&self.node_name);
        Ok(CniConfig {
            zds_socket: self.inpod_uds.clone(),
            plugin_socket: self.plugin_socket.clone(),
            state_dir: self.state_dir.clone(),
            xds: crate::xds::XdsConfig {
                server: crate::grpc::ControlPlaneEndpoint {
                    address,
                    root_pem,
                    server_name: self.control_plane_server_name.clone(),
                    token_path: self.auth_token.clone(),
                },
                node_name,
                cluster_id: self.cluster_id.clone(),
            },
            enroll_wait: Duration::from_millis(self.enroll_wait_ms),
            capture: self.capture_config()?,
        })
    }

    fn capture_config(&self) -> anyhow::Result<Option<super::capture::CniCaptureConfig>> {
        if !self.ebpf_capture {
            return Ok(None);
        }
        crate::redirect::check_kernel(None, true)?;
        Ok(Some(super::capture::CniCaptureConfig {
            capture: crate::redirect::CaptureConfig {
                pin_dir: self.pin_dir.clone(),
                cgroup: crate::redirect::cgroup2_root().context("finding the cgroup2 mount")?,
                exclusions: crate::redirect::Exclusions {
                    outbound_ports: self.exclude_outbound_ports.clone(),
                    inbound_ports: self.exclude_inbound_ports.clone(),
                    cidrs: vec![],
                    probe_sources: self.probe_sources.clone(),
                },
                max_pods: crate::redirect::DEFAULT_MAX_PODS,
                for_foreign_proxy: true,
                sockmap_shortcut: self.sockmap_shortcut,
                shortcut_max_sockets: crate::redirect::DEFAULT_SHORTCUT_MAX_SOCKETS,
            },
            proxy_cgroups: self.proxy_cgroup.clone(),
        }))
    }
}

/// Runs `ztunnel cni`: the plugin (never returns) or the daemon until Ctrl-C.
pub fn run(args: CniArgs) -> anyhow::Result<()> {
    if args.is_plugin() {
        super::plugin::main_process();
    }
    let cfg = args.config()?;
    if let (Some(bin_dir), Some(conf_dir)) = (args.cni_bin_dir.clone(), args.cni_conf_dir.clone()) {
        let install = super::install::InstallConfig {
            bin_dir,
            conf_dir,
            conf_name: args.cni_conf_name.clone(),
            daemon_socket: args.host_plugin_socket.clone().unwrap_or_else(|| args.plugin_socket.clone()),
        };
        let binary = std::env::current_exe().context("finding this binary")?;
        let conf = super::install::install(&install, &binary).context("installing the CNI plugin")?;
        tracing::info!(conf = %conf.display(), "CNI plugin installed and chained");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async move {
        let daemon = CniDaemon::start(cfg).await.context("starting the cni daemon")?;
        tokio::signal::ctrl_c().await?;
        tracing::info!(known = daemon.status().known.len(), "shutting down; pod records stay for the next start");
        Ok(())
    })
}
