//! `ztunnel`: one binary, one subcommand per role. Wiring only; the behaviour lives in the
//! library so tests drive it in-process.
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::sync::Arc;

use ztunnel::admin::{AdminConfig, LogControl};
use ztunnel::identity::{CaConfig, InProcessCa};
use ztunnel::node::{Node, NodeConfig};
use ztunnel::redirect::{cgroup2_root, CaptureConfig, Exclusions};

#[derive(Parser)]
#[command(name = "ztunnel", about = "eBPF-accelerated ambient mesh data plane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// The per-node agent: enrolls pods, captures their traffic with eBPF, proxies it.
    Node(NodeArgs),
    /// The control plane: serves Istio's delta ADS and CA APIs from a directory of
    /// Kubernetes YAML (or, built with `--features kube`, a live API server).
    Controller(ControllerArgs),
    /// The node-local side of enrollment: serves ZDS to the node agent and enrolls the
    /// ambient pods the CNI plugin reports (`ztunnel cni plugin` is that plugin).
    Cni(ztunnel::cni::cli::CniArgs),
    /// The L7 proxy: takes HBONE for services that use it (`istio.io/use-waypoint`) and
    /// routes each HTTP request by their VirtualServices.
    Waypoint(WaypointArgs),
    /// The ingress gateway: serves the Istio Gateways its labels select (HTTP, HTTPS,
    /// TLS passthrough) and routes into the mesh by the VirtualServices bound to them.
    Gateway(GatewayArgs),
    /// The operator's view of a running node agent (like `istioctl ztunnel-config`).
    Ctl(CtlArgs),
}

#[derive(Parser)]
struct CtlArgs {
    /// The agent's admin endpoint.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: std::net::SocketAddr,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: ztunnel::ctl::Output,
    #[command(subcommand)]
    what: CtlWhat,
}

#[derive(Subcommand)]
enum CtlWhat {
    #[command(flatten)]
    Show(ztunnel::ctl::Resource),
    /// Shows the agent's log filter, or sets it (e.g. `debug`, `info,ztunnel::proxy=debug`).
    LogLevel { level: Option<String> },
}

/// Where workloads, services and policies come from (node and waypoint).
#[derive(clap::Args)]
struct StateArgs {
    /// Istio local-config YAML ({workloads, services, policies}); re-read on change.
    #[arg(long, env = "LOCAL_XDS_PATH")]
    local_config: Option<PathBuf>,
    /// Control plane serving delta ADS (istiod or `ztunnel controller`), e.g.
    /// `https://istiod.istio-system.svc:15012`; the state then comes from it.
    #[arg(long, env = "XDS_ADDRESS")]
    xds_address: Option<String>,
    /// PEM roots for the xDS server's certificate.
    #[arg(long, env = "XDS_ROOT_CA")]
    xds_root_ca: Option<PathBuf>,
    /// This node's name, sent to the control plane.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_name: String,
    /// Cluster id, sent to the control plane.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
}

/// Where spans go (waypoint, and the node agent's opt-in connection spans).
#[derive(clap::Args)]
struct TraceArgs {
    /// OTLP/HTTP (protobuf) traces endpoint, e.g. `http://jaeger-collector:4318/v1/traces`;
    /// unset: no spans are exported (`traceparent` is still carried on).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Percent of new traces recorded (a request with a sampled `traceparent` is always
    /// recorded, an unsampled one never), as Istio's mesh `tracing.sampling` (default 1).
    #[arg(long, env = "TRACE_SAMPLING", default_value_t = 1.0)]
    trace_sampling: f64,
    /// How long finished spans are batched before they are posted, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    trace_export_delay_ms: u64,
}

impl TraceArgs {
    fn config(&self, service_name: String) -> Option<ztunnel::spans::TraceConfig> {
        self.otlp_endpoint.as_ref().map(|endpoint| ztunnel::spans::TraceConfig {
            endpoint: endpoint.clone(),
            service_name,
            sampling: self.trace_sampling / 100.0,
            export_delay: std::time::Duration::from_millis(self.trace_export_delay_ms),
        })
    }
}

/// Where certificates come from, and how the control plane is reached (node and waypoint).
#[derive(clap::Args)]
struct CaArgs {
    /// Istio plug-in CA directory (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem).
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Where a generated mesh root is kept so restarts keep trust (and processes sharing
    /// it trust each other).
    #[arg(long, default_value = "/var/run/ztunnel/ca")]
    ca_state_dir: PathBuf,
    /// CA serving `IstioCertificateService` (istiod or `ztunnel controller`); without it the
    /// in-process CA signs.
    #[arg(long, env = "CA_ADDRESS")]
    ca_address: Option<String>,
    /// PEM roots for the CA server's certificate.
    #[arg(long, env = "CA_ROOT_CA")]
    ca_root_ca: Option<PathBuf>,
    /// File with the bearer token sent to the xDS server and the CA.
    #[arg(long, env = "AUTH_TOKEN")]
    auth_token: Option<PathBuf>,
    /// Name expected in the control plane's certificate (default: the address's host).
    #[arg(long, env = "ZTUNNEL_CONTROL_PLANE_SERVER_NAME")]
    control_plane_server_name: Option<String>,
}

#[derive(Parser)]
struct WaypointArgs {
    /// HBONE listener.
    #[arg(long, default_value = "[::]:15008")]
    listen: std::net::SocketAddr,
    #[command(flatten)]
    l7: L7Args,
}

#[derive(Parser)]
struct GatewayArgs {
    /// This gateway's labels (`key=value`, repeatable): it implements the Istio Gateways whose
    /// selector they match (Istio's ingress gateway carries `istio=ingressgateway`).
    #[arg(long = "label", value_parser = parse_label, default_value = "istio=ingressgateway")]
    labels: Vec<(String, String)>,
    /// Address the Gateway servers' ports are bound on.
    #[arg(long, default_value = "::")]
    bind: std::net::IpAddr,
    #[command(flatten)]
    l7: L7Args,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not key=value"))
}

/// What the waypoint and the ingress gateway both take: identity, state, L7 objects,
/// certificates, telemetry and the operator ports.
#[derive(clap::Args)]
struct L7Args {
    /// The proxy's namespace (its identity's and its Gateway's).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The proxy's service account (its identity); `waypoint` or `istio-ingressgateway`
    /// when unset.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    service_account: Option<String>,
    /// The proxy's Gateway (deployment) name, for policies with a targetRef to it and its
    /// telemetry; `waypoint` or `istio-ingressgateway` when unset.
    #[arg(long, env = "GATEWAY_NAME")]
    gateway_name: Option<String>,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    #[command(flatten)]
    state: StateArgs,
    /// Directory (or file) of VirtualServices, DestinationRules, AuthorizationPolicies,
    /// Gateways and TLS Secrets; re-read on change.
    #[arg(long)]
    routes_dir: Option<PathBuf>,
    #[command(flatten)]
    ca: CaArgs,
    /// Access-log line format with Envoy's command operators (`%REQ(USER-AGENT)%`,
    /// `%RESPONSE_CODE%`, ...); Istio's default format when unset. Lines go to stdout as
    /// they are, in batches (at most 100 ms late), while the `access` target is on at info;
    /// `LOG_FORMAT=json` writes Istio's JSON keys instead.
    #[arg(long, env = "ACCESS_LOG_FORMAT")]
    access_log_format: Option<String>,
    #[command(flatten)]
    trace: TraceArgs,
    /// Prometheus listener.
    #[arg(long, default_value = "[::]:15020")]
    metrics_addr: std::net::SocketAddr,
    /// Readiness listener.
    #[arg(long, default_value = "[::]:15021")]
    readiness_addr: std::net::SocketAddr,
    /// Admin listener: localhost only.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: std::net::SocketAddr,
    /// Data-path worker threads.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
}

#[derive(Parser)]
struct ControllerArgs {
    /// Directory (or file) of Kubernetes YAML; re-read on change.
    #[arg(long, env = "CONTROLLER_CONFIG_DIR", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    config_dir: Option<PathBuf>,
    /// Read objects from the Kubernetes API server instead (in-cluster service account, else
    /// KUBECONFIG / ~/.kube/config); needs a build with `--features kube`.
    #[arg(long)]
    kubernetes: bool,
    /// gRPC listener for ADS and the CA (istiod's port).
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: std::net::SocketAddr,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// Istio plug-in CA directory (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem).
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Where a generated mesh root is kept so restarts keep trust.
    #[arg(long, default_value = "/var/run/ztunnel/controller/ca")]
    ca_state_dir: PathBuf,
    /// One bearer-token file per node (created for nodes that run pods).
    #[arg(long, default_value = "/var/run/ztunnel/controller/tokens")]
    tokens_dir: PathBuf,
    /// Writes the mesh root (PEM) here for node agents' `XDS_ROOT_CA` / `CA_ROOT_CA`.
    #[arg(long)]
    root_cert_out: Option<PathBuf>,
    /// Only load the directory, list every object's status, and exit (non-zero when any
    /// object was rejected).
    #[arg(long)]
    check: bool,
    /// Admin listener (`/config_dump` for `ztunnel ctl`, `/logging`): localhost only.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: std::net::SocketAddr,
    /// Prometheus listener.
    #[arg(long, default_value = "[::]:15014")]
    metrics_addr: std::net::SocketAddr,
    /// Readiness listener.
    #[arg(long, default_value = "[::]:15021")]
    readiness_addr: std::net::SocketAddr,
}

#[derive(Parser)]
struct NodeArgs {
    /// Enrollment socket this agent serves (unless --inpod-uds is given).
    #[arg(long, env = "ZTUNNEL_ENROLLMENT_SOCKET", default_value = "/var/run/ztunnel/ztunnel.sock")]
    enrollment_socket: PathBuf,
    /// Connect to the CNI's ZDS socket instead of serving one (Istio's direction:
    /// `ztunnel cni` or istio-cni serves it).
    #[arg(long, env = "INPOD_UDS")]
    inpod_uds: Option<PathBuf>,
    /// Pin directory on bpffs.
    #[arg(long, default_value = "/sys/fs/bpf/ztunnel")]
    pin_dir: PathBuf,
    /// Per-pod state kept across restarts.
    #[arg(long, default_value = "/var/run/ztunnel/pods")]
    state_dir: PathBuf,
    /// cgroup v2 directory above all pods (default: the cgroup2 root).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Outbound destination port never captured (repeatable).
    #[arg(long = "exclude-outbound-port")]
    exclude_outbound_ports: Vec<u16>,
    /// Inbound pod port never captured (repeatable).
    #[arg(long = "exclude-inbound-port")]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound CIDR never captured, e.g. 10.0.0.0/8 (repeatable).
    #[arg(long = "exclude-cidr", value_parser = parse_cidr)]
    exclude_cidrs: Vec<(IpAddr, u8)>,
    /// Source address of node health probes; reaches apps directly (repeatable).
    #[arg(long = "probe-source", default_value = "169.254.7.127")]
    probe_sources: Vec<IpAddr>,
    /// SPIFFE trust domain.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    #[command(flatten)]
    ca: CaArgs,
    #[command(flatten)]
    state: StateArgs,
    /// Apps see clients' own addresses (a transparent dial and per-pod reply routing); off,
    /// they see 127.0.0.6 (IPv4) or the pod's own address (IPv6).
    #[arg(long, env = "ENABLE_ORIG_SRC", default_value_t = true, action = clap::ArgAction::Set)]
    enable_orig_src: bool,
    /// Connections between two pods of this agent go from the outbound side to the
    /// destination's inbound side inside the process (same mesh policy, metrics and logs as
    /// HBONE; no TLS, no extra TCP legs). Off by default: no packet then passes between the
    /// two pods, so the CNI's Kubernetes NetworkPolicy is not applied to that connection.
    #[arg(long, env = "ZTUNNEL_SAME_NODE_FAST_PATH", default_value_t = false, action = clap::ArgAction::Set)]
    same_node_fast_path: bool,
    /// Splice the in-pod loopback legs (app to proxy, proxy to app) with a SOCKHASH and an
    /// sk_msg program, past the loopback TCP stack. Opt-in; switch it off at run time with
    /// `POST /shortcut?enabled=false` on the admin port.
    #[arg(long, env = "ZTUNNEL_SOCKMAP_SHORTCUT", default_value_t = false, action = clap::ArgAction::Set)]
    sockmap_shortcut: bool,
    /// Sockets the shortcut tracks at once (two per leg); beyond it they take the normal path.
    #[arg(long, env = "ZTUNNEL_SOCKMAP_MAX_SOCKETS", default_value_t = ztunnel::redirect::DEFAULT_SHORTCUT_MAX_SOCKETS)]
    sockmap_max_sockets: u32,
    /// Report this kernel feature as missing (see `ztunnel::redirect::FEATURES`): shows how
    /// the agent refuses a kernel below its floor.
    #[arg(long, hide = true)]
    simulate_missing_kernel_feature: Option<String>,
    /// Admin listener (config_dump, logging, quitquitquit): localhost only.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: std::net::SocketAddr,
    /// Prometheus listener.
    #[arg(long, default_value = "[::]:15020")]
    metrics_addr: std::net::SocketAddr,
    /// Readiness listener.
    #[arg(long, default_value = "[::]:15021")]
    readiness_addr: std::net::SocketAddr,
    /// Data-path worker threads (the admin server has its own thread).
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
    /// Where a new agent takes this one's pods and listening sockets over (hitless upgrade
    /// or restart); a starting agent first takes them from whatever agent serves it.
    #[arg(long, env = "ZTUNNEL_HANDOFF_SOCKET", default_value = "/var/run/ztunnel/handoff.sock")]
    handoff_socket: PathBuf,
    /// After handing its pods over, how long (seconds) the old agent keeps relaying the
    /// connections it had accepted before it exits.
    #[arg(long, env = "ZTUNNEL_DRAIN_TIMEOUT", default_value_t = 30)]
    drain_timeout: u64,
    /// Of a pod listener's connections, how many one remote address may hold.
    #[arg(long, env = "ZTUNNEL_MAX_CONNECTIONS_PER_PEER", default_value_t = 1024)]
    max_connections_per_peer: usize,
    /// Pods this agent can enroll (sizes the kernel maps when they are first created).
    #[arg(long, env = "ZTUNNEL_MAX_PODS", default_value_t = ztunnel::redirect::DEFAULT_MAX_PODS)]
    max_pods: u32,
    /// Concurrent connections one pod may hold on each of its listeners; past it new
    /// connections are reset (a flood against one pod cannot starve the others).
    #[arg(long, env = "ZTUNNEL_MAX_CONNECTIONS_PER_POD", default_value_t = 4096)]
    max_connections_per_pod: usize,
    /// Remove every program, link, pin and state this agent created, then exit.
    #[arg(long)]
    uninstall: bool,
    #[command(flatten)]
    trace: TraceArgs,
    /// A span per proxied connection (outbound client, inbound server, parented on the
    /// CONNECT's `traceparent`), exported to --otlp-endpoint. Off by default: a connection
    /// span per connection is costly and L4 spans are rarely wanted.
    #[arg(long, env = "TRACE_CONNECTIONS", requires = "otlp_endpoint")]
    trace_connections: bool,
}

fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = s.split_once('/').ok_or("expected ADDR/LEN")?;
    let ip: IpAddr = ip.parse().map_err(|e| format!("{e}"))?;
    let len: u8 = len.parse().map_err(|e| format!("{e}"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("prefix length {len} > {max}"));
    }
    Ok((ip, len))
}

fn main() -> anyhow::Result<()> {
    // A container runtime runs the plugin by its file name, with no arguments.
    if ztunnel::cni::plugin::invoked_as_plugin() {
        ztunnel::cni::plugin::main_process();
    }
    let cli = Cli::parse();
    // The plugin's stdout carries its result only: no logging set up for it.
    let log = match &cli.cmd {
        Cmd::Cni(args) if args.is_plugin() => None,
        Cmd::Ctl(_) => None,
        _ => Some(init_logging()),
    };
    match cli.cmd {
        Cmd::Node(args) => run_node(args, log),
        Cmd::Controller(args) => run_controller(args),
        Cmd::Cni(args) => ztunnel::cni::cli::run(args),
        Cmd::Waypoint(args) => run_waypoint(args, log),
        Cmd::Gateway(args) => run_gateway(args, log),
        Cmd::Ctl(args) => run_ctl(args),
    }
}

fn run_ctl(args: CtlArgs) -> anyhow::Result<()> {
    use ztunnel::ctl;
    let resource = match args.what {
        CtlWhat::LogLevel { level } => {
            print!("{}", ctl::render_log_level(&ctl::log_level(args.admin, level.as_deref())?, args.output)?);
            return Ok(());
        }
        CtlWhat::Show(r) => r,
    };
    let dump = ctl::fetch_dump(args.admin)?;
    print!("{}", ctl::render(&ctl::select(&dump, resource), resource, args.output)?);
    Ok(())
}

/// Where certificates come from: `CA_ADDRESS` when set, else the in-process CA (plug-in
/// files, or a root kept in `state_dir`).
fn certificate_provider(
    trust_domain: &str,
    plugin_dir: Option<PathBuf>,
    state_dir: PathBuf,
    remote: Option<ztunnel::grpc::ControlPlaneEndpoint>,
) -> anyhow::Result<Arc<dyn ztunnel::identity::CertificateProvider>> {
    Ok(match remote {
        Some(endpoint) => {
            Arc::new(ztunnel::identity::RemoteCa::new(endpoint, None, ztunnel::identity::DEFAULT_LEAF_TTL))
        }
        None => {
            let mut ca = CaConfig::new(trust_domain);
            ca.plugin_dir = plugin_dir;
            ca.state_dir = Some(state_dir);
            Arc::new(InProcessCa::new(ca).context("initialising the CA")?)
        }
    })
}

/// The L7 proxy configuration both `waypoint` and `gateway` build from their flags;
/// `role` names the default service account and Gateway (`waypoint`, `istio-ingressgateway`).
fn l7_config(
    args: &L7Args,
    listen: std::net::SocketAddr,
    role: &str,
) -> anyhow::Result<ztunnel::waypoint::WaypointConfig> {
    use ztunnel::waypoint::{StateSource, WaypointConfig};
    let endpoint = |address: String, root: &Option<PathBuf>| -> anyhow::Result<ztunnel::grpc::ControlPlaneEndpoint> {
        Ok(ztunnel::grpc::ControlPlaneEndpoint {
            address,
            root_pem: root
                .as_ref()
                .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
                .transpose()?,
            server_name: args.ca.control_plane_server_name.clone(),
            token_path: args.ca.auth_token.clone(),
        })
    };
    let remote = args.ca.ca_address.clone().map(|a| endpoint(a, &args.ca.ca_root_ca)).transpose()?;
    let state = match (&args.state.local_config, &args.state.xds_address) {
        (Some(path), _) => StateSource::LocalConfig(path.clone()),
        (None, Some(address)) => StateSource::Xds(ztunnel::xds::XdsConfig {
            server: endpoint(address.clone(), &args.state.xds_root_ca)?,
            node_name: ztunnel::grpc::node_name(&args.state.node_name),
            cluster_id: args.state.cluster_id.clone(),
        }),
        (None, None) => anyhow::bail!("give --local-config or --xds-address"),
    };
    let ca = certificate_provider(&args.trust_domain, args.ca.ca_dir.clone(), args.ca.ca_state_dir.clone(), remote)?;
    let service_account = args.service_account.as_deref().unwrap_or(role);
    let gateway_name = args.gateway_name.clone().unwrap_or_else(|| role.to_string());
    let identity = ztunnel::identity::Identity::new(&args.trust_domain, &args.namespace, service_account)
        .with_context(|| format!("{role} identity"))?;
    Ok(WaypointConfig {
        listen,
        identity,
        name: (args.namespace.clone(), gateway_name.clone()),
        trust_domain: args.trust_domain.clone(),
        ca,
        state,
        routes_dir: args.routes_dir.clone(),
        // Istio names a gateway's spans' service `<gateway>.<namespace>`.
        tracing: args.trace.config(format!("{gateway_name}.{}", args.namespace)),
        access_log_format: args.access_log_format.clone(),
        access_log_json: std::env::var("LOG_FORMAT").as_deref() == Ok("json"),
        workers: 0,
    })
}

/// Runs `start` on a data-path runtime with the admin, metrics and readiness endpoints on
/// their own thread, until Ctrl-C. `start` returns what to keep alive, a dump and a banner.
/// `own_threads`: the proxy serves on threads of its own, so this runtime only keeps its
/// state and configuration current, on one thread.
fn run_l7<T, F, Fut>(args: &L7Args, log: Option<Arc<LogControl>>, own_threads: bool, start: F) -> anyhow::Result<()>
where
    F: FnOnce(Arc<ztunnel::metrics::Metrics>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(T, ztunnel::admin::DumpFn, String)>>,
{
    let rt = if own_threads {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.worker_threads.max(1)).enable_all().build()?
    };
    let admin_cfg = AdminConfig {
        admin_addr: args.admin_addr,
        metrics_addr: args.metrics_addr,
        readiness_addr: args.readiness_addr,
    };
    rt.block_on(async move {
        let metrics = Arc::new(ztunnel::metrics::Metrics::new());
        let (_running, dump, banner) = start(metrics.clone()).await?;
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
        // `/quitquitquit`, SIGTERM and Ctrl-C all end here, so the proxy is dropped in order
        // (its serving threads joined, its buffered access-log lines written).
        let stop = Arc::new(tokio::sync::Notify::new());
        let on_quit = stop.clone();
        let quit = Arc::new(move || on_quit.notify_one());
        let _admin = match log {
            Some(log) => ztunnel::admin::start_with_logging(admin_cfg, metrics, dump, ready, quit, log),
            None => ztunnel::admin::start(admin_cfg, metrics, dump, ready, quit),
        }
        .context("starting the admin server")?;
        println!("{banner}");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
            _ = stop.notified() => {}
        }
        // The signal handler stays installed: a shutdown that hangs (a serving thread that
        // does not stop) must still end, as an unhandled SIGTERM would have.
        std::thread::spawn(|| {
            std::thread::sleep(std::time::Duration::from_secs(10));
            eprintln!("shutdown took longer than 10 s; exiting");
            std::process::exit(1);
        });
        Ok(())
    })
}

fn run_waypoint(args: WaypointArgs, log: Option<Arc<LogControl>>) -> anyhow::Result<()> {
    let mut cfg = l7_config(&args.l7, args.listen, "waypoint")?;
    cfg.workers = args.l7.worker_threads.max(1);
    run_l7(&args.l7, log, true, |metrics| async move {
        let waypoint = ztunnel::waypoint::Waypoint::start(cfg, metrics).await.context("starting the waypoint")?;
        let routes = waypoint.routes_handle();
        let dump: ztunnel::admin::DumpFn = Arc::new(move || routes.status_json());
        let banner = format!("waypoint listening on {}", waypoint.addr());
        Ok((waypoint, dump, banner))
    })
}

fn run_gateway(args: GatewayArgs, log: Option<Arc<LogControl>>) -> anyhow::Result<()> {
    let proxy = l7_config(&args.l7, std::net::SocketAddr::new(args.bind, 0), "istio-ingressgateway")?;
    let cfg = ztunnel::gateway::GatewayConfig { proxy, labels: args.labels.into_iter().collect(), bind: args.bind };
    run_l7(&args.l7, log, false, |metrics| async move {
        let gateway = ztunnel::gateway::IngressGateway::start(cfg, metrics).await.context("starting the gateway")?;
        let routes = gateway.routes_handle();
        let dump: ztunnel::admin::DumpFn = Arc::new(move || routes.status_json());
        let ports: Vec<String> = gateway.listening().iter().map(|(_, a)| a.to_string()).collect();
        let banner =
            format!("gateway listening on {}", if ports.is_empty() { "no port yet".into() } else { ports.join(", ") });
        Ok((gateway, dump, banner))
    })
}

/// Where `ztunnel controller` reads objects from; `--kubernetes` fails clearly in a build
/// without the `kube` feature.
fn controller_source(args: &ControllerArgs) -> anyhow::Result<ztunnel::controller::Source> {
    use ztunnel::controller::Source;
    match (&args.config_dir, args.kubernetes) {
        (Some(dir), false) => Ok(Source::Directory(dir.clone())),
        #[cfg(feature = "kube")]
        (None, true) => Ok(Source::Kubernetes),
        #[cfg(not(feature = "kube"))]
        (None, true) => anyhow::bail!(
            "--kubernetes: this ztunnel was built without the kube feature (build with `cargo build --features kube`), \
             use --config-dir"
        ),
        _ => anyhow::bail!("give exactly one of --config-dir and --kubernetes"),
    }
}

/// `--check`: the objects of `source` (for Kubernetes, the first full list) as a model.
fn check_model(
    source: &ztunnel::controller::Source,
    options: ztunnel::controller::Options,
) -> anyhow::Result<ztunnel::controller::Model> {
    match source {
        ztunnel::controller::Source::Directory(dir) => {
            ztunnel::controller::load(dir, options).with_context(|| format!("reading {}", dir.display()))
        }
        #[cfg(feature = "kube")]
        ztunnel::controller::Source::Kubernetes => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let client = ztunnel::controller::kube::client().await.context("kubernetes client configuration")?;
                let mut watch = ztunnel::controller::kube::KubeWatch::spawn(client, std::time::Duration::ZERO);
                let first = watch.next().await.context("kubernetes watches stopped before the first list")?;
                Ok(ztunnel::controller::Model::build((*first).clone(), options))
            })
        }
    }
}

fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    use ztunnel::controller::{Controller, ControllerConfig, Options};
    let options =
        Options { trust_domain: args.trust_domain.clone(), cluster_id: args.cluster_id.clone(), ..Default::default() };
    let source = controller_source(&args)?;
    if args.check {
        let model = check_model(&source, options)?;
        let mut errors = 0;
        for e in model.status() {
            println!("{e}");
            errors += e.outcome.is_error() as usize;
        }
        for c in model.route_conditions() {
            println!("{c}");
        }
        println!(
            "{} workloads, {} services, {} policies; {errors} objects rejected",
            model.workloads.len(),
            model.services.len(),
            model.authorizations.len()
        );
        anyhow::ensure!(errors == 0, "{errors} objects rejected");
        return Ok(());
    }
    let mut ca = CaConfig::new(args.trust_domain);
    ca.plugin_dir = args.ca_dir;
    ca.state_dir = Some(args.ca_state_dir);
    let ca = Arc::new(InProcessCa::new(ca).context("initialising the CA")?);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let cfg = ControllerConfig {
            source,
            listen: args.listen,
            options,
            ca,
            tokens_dir: args.tokens_dir,
            poll_interval: std::time::Duration::from_millis(50),
        };
        let controller = Controller::start(cfg).await?;
        if let Some(path) = &args.root_cert_out {
            std::fs::write(path, controller.root_pem()).with_context(|| format!("writing {}", path.display()))?;
        }
        let controller = Arc::new(controller);
        let weak = Arc::downgrade(&controller);
        let dump: ztunnel::admin::DumpFn =
            Arc::new(move || weak.upgrade().map(|c| c.config_dump()).unwrap_or(serde_json::Value::Null));
        let admin_cfg = AdminConfig {
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            readiness_addr: args.readiness_addr,
        };
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let quit = Arc::new(|| std::process::exit(0));
        let metrics = Arc::new(ztunnel::metrics::Metrics::new());
        let _admin =
            ztunnel::admin::start(admin_cfg, metrics, dump, ready, quit).context("starting the admin server")?;
        println!("controller listening on {}", controller.addr());
        tokio::signal::ctrl_c().await?;
        if let Ok(controller) = Arc::try_unwrap(controller) {
            controller.stop().await;
        }
        Ok(())
    })
}

/// Text or JSON (`LOG_FORMAT=json`) logs, filtered by `RUST_LOG`, changeable at run time
/// through the admin `/logging` endpoint.
fn init_logging() -> Arc<LogControl> {
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let initial = filter.to_string();
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = if std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    tracing_subscriber::registry().with(filter).with(fmt).init();
    Arc::new(LogControl::from_reload_handle(handle, initial))
}

fn run_node(args: NodeArgs, log: Option<Arc<LogControl>>) -> anyhow::Result<()> {
    if args.uninstall {
        return uninstall(&args);
    }
    ztunnel::redirect::check_kernel(args.simulate_missing_kernel_feature.as_deref(), false)?;
    ztunnel::process::raise_fd_limit();
    ztunnel::process::start_heap_trimmer();
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => cgroup2_root().context("finding the cgroup2 mount")?,
    };
    let read = |p: &Option<PathBuf>| -> anyhow::Result<Option<Vec<u8>>> {
        p.as_ref().map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display()))).transpose()
    };
    let endpoint = |address: String, root_pem: Option<Vec<u8>>| ztunnel::grpc::ControlPlaneEndpoint {
        address,
        root_pem,
        server_name: args.ca.control_plane_server_name.clone(),
        token_path: args.ca.auth_token.clone(),
    };
    let node_name = ztunnel::grpc::node_name(&args.state.node_name);
    let xds = match args.state.xds_address.clone() {
        Some(address) => Some(ztunnel::xds::XdsConfig {
            server: endpoint(address, read(&args.state.xds_root_ca)?),
            node_name,
            cluster_id: args.state.cluster_id.clone(),
        }),
        None => None,
    };
    let remote = match args.ca.ca_address.clone() {
        Some(address) => Some(endpoint(address, read(&args.ca.ca_root_ca)?)),
        None => None,
    };
    let ca = certificate_provider(&args.trust_domain, args.ca.ca_dir.clone(), args.ca.ca_state_dir.clone(), remote)?;
    let cfg = NodeConfig {
        enrollment_socket: args.enrollment_socket,
        zds_connect: args.inpod_uds,
        state_dir: args.state_dir,
        trust_domain: args.trust_domain,
        ca,
        local_config: args.state.local_config,
        xds,
        log_control: log,
        keep_source: args.enable_orig_src,
        same_node_fast_path: args.same_node_fast_path,
        connection_spans: if args.trace_connections { args.trace.config("ztunnel".into()) } else { None },
        handoff_socket: Some(args.handoff_socket),
        limits: ztunnel::proxy::limit::Limits {
            connections_per_pod_listener: args.max_connections_per_pod,
            connections_per_peer: args.max_connections_per_peer,
        },
        admin: Some(AdminConfig {
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            readiness_addr: args.readiness_addr,
        }),
        capture: CaptureConfig {
            pin_dir: args.pin_dir,
            cgroup,
            max_pods: args.max_pods,
            for_foreign_proxy: false,
            sockmap_shortcut: args.sockmap_shortcut,
            shortcut_max_sockets: args.sockmap_max_sockets,
            exclusions: Exclusions {
                outbound_ports: args.exclude_outbound_ports,
                inbound_ports: args.exclude_inbound_ports,
                cidrs: args.exclude_cidrs,
                probe_sources: args.probe_sources,
            },
        },
    };
    let drain_timeout = args.drain_timeout;
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.worker_threads.max(1)).enable_all().build()?;
    rt.block_on(async move {
        let node = Node::start(cfg).await.context("starting node agent")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                r?;
                tracing::info!("shutting down; capture stays installed (use --uninstall to remove)");
            }
            open = node.retired(std::time::Duration::from_secs(drain_timeout)) => {
                tracing::info!(still_open = open, "pods handed to the successor and connections drained; exiting");
            }
        }
        Ok(())
    })
}

/// Removes everything a node agent installed, without starting one: detaches every pinned
/// link, unpins the maps (the kernel frees them and their entries), forgets pod state.
fn uninstall(args: &NodeArgs) -> anyhow::Result<()> {
    ztunnel::redirect::remove_pinned(&args.pin_dir).context("removing pinned programs and maps")?;
    if let Ok(entries) = std::fs::read_dir(&args.state_dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let _ = std::fs::remove_dir(&args.state_dir);
    }
    // In --inpod-uds mode the socket at that path (often the same) belongs to the CNI.
    if args.inpod_uds.is_none() {
        let _ = std::fs::remove_file(&args.enrollment_socket);
    }
    let _ = std::fs::remove_file(&args.handoff_socket);
    tracing::info!(pin_dir = %args.pin_dir.display(), "uninstalled");
    Ok(())
}
