//! A standalone ambient mesh built from a directory of Kubernetes YAML, the way a user runs
//! one: `ztunnel controller` serves the objects over delta ADS and signs certificates; the
//! mini-cluster gets one pod per workload, on the node and with the address the YAML gives
//! it; each node runs a `ztunnel cni` agent and a node agent that starts empty and connects
//! to it; the real CNI plugin runs for each pod as a container runtime would. The demo and
//! the end-to-end tests of the L7 path share it.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ztunnel::controller::{Controller, ControllerConfig, Model, Options, Source};
use ztunnel::identity::{CaConfig, InProcessCa};

use crate::cni::CniNode;
use crate::mesh::{ControlPlaneAccess, MeshNode};
use crate::{Cluster, Pod};

/// The node names the YAML places pods on (`mesh.local/nodes`).
pub const NODES: [&str; 2] = ["node-a", "node-b"];

/// The running mesh; everything stops and is cleaned up when dropped (agents first).
pub struct Ambient {
    pub agents: Vec<MeshNode>,
    pub cnis: Vec<CniNode>,
    /// Each pod with its service account.
    pub pods: Vec<(Pod, String)>,
    pub cluster: Cluster,
    pub model: Arc<Model>,
    pub access: ControlPlaneAccess,
    controller: Option<Controller>,
    /// The directory the controller reads (a copy the caller may edit).
    pub config: PathBuf,
    pub rt: tokio::runtime::Runtime,
}

/// Copies the `*.yaml` files of `src` (not its subdirectories) into `dst`.
pub fn copy_yaml(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let path = e?.path();
        if path.is_file() && path.extension().is_some_and(|x| x == "yaml") {
            std::fs::copy(&path, dst.join(path.file_name().context("file name")?))?;
        }
    }
    Ok(())
}

impl Ambient {
    /// Starts the mesh for a copy of `yaml_dir` (kept under `work`), running the CNI
    /// plugin for every pod except those `skip_cni` names (e.g. a waypoint, whose own
    /// traffic is never captured), and waits until the CNI agents enrolled the rest.
    pub fn start(yaml_dir: &Path, work: &Path, skip_cni: impl Fn(&str) -> bool) -> Result<Ambient> {
        let config = work.join("config");
        copy_yaml(yaml_dir, &config)?;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let ca = Arc::new(InProcessCa::new(CaConfig::new("cluster.local"))?);
        let cfg = ControllerConfig {
            source: Source::Directory(config.clone()),
            listen: "127.0.0.1:0".parse()?,
            options: Options::default(),
            ca,
            tokens_dir: work.join("tokens"),
            poll_interval: Duration::from_millis(200),
        };
        let controller = rt.block_on(Controller::start(cfg)).context("starting the controller")?;
        let model = controller.model();
        let errors: Vec<String> =
            controller.status().iter().filter(|e| e.outcome.is_error()).map(|e| e.to_string()).collect();
        ensure!(errors.is_empty(), "{} has rejected objects: {errors:?}", yaml_dir.display());
        let mut cluster = Cluster::new(2).context("building the mini-cluster (needs root)")?;
        let pods = create_pods(&mut cluster, &model)?;
        let access = ControlPlaneAccess {
            address: controller.addr(),
            root_pem: controller.root_pem().into(),
            tokens_dir: work.join("tokens"),
            node_names: NODES.iter().map(|s| s.to_string()).collect(),
        };
        let cnis = vec![CniNode::start(&cluster, 0, &access)?, CniNode::start(&cluster, 1, &access)?];
        let agents = vec![
            MeshNode::start_connecting(&cluster, 0, cnis[0].zds_socket(), Some(&access))?,
            MeshNode::start_connecting(&cluster, 1, cnis[1].zds_socket(), Some(&access))?,
        ];
        let mut expected = [0usize; 2];
        for (p, _) in &pods {
            if skip_cni(p.name()) {
                continue;
            }
            let ns = model.workloads.values().find(|w| w.name == p.name()).map(|w| w.namespace.clone());
            let run = cnis[p.node()].plugin_in("ADD", p, ns.as_deref().unwrap_or("default"));
            ensure!(run.code == Some(0), "CNI ADD for {} failed: {} {}", p.name(), run.stdout, run.stderr);
            expected[p.node()] += 1;
        }
        for (cni, n) in cnis.iter().zip(expected) {
            cni.wait(Duration::from_secs(10), |s| s.enrolled.len() == n)?;
        }
        Ok(Ambient { agents, cnis, pods, cluster, model, access, controller: Some(controller), config, rt })
    }

    /// The control plane.
    pub fn controller(&self) -> &Controller {
        self.controller.as_ref().expect("controller runs until drop")
    }

    /// The pod whose name starts with `prefix`.
    pub fn pod(&self, prefix: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .map(|(p, _)| p)
            .find(|p| p.name().starts_with(prefix))
            .with_context(|| format!("no pod {prefix}*"))
    }

    /// The first VIP of service `name`, on `port`.
    pub fn vip(&self, name: &str, port: u16) -> Result<SocketAddr> {
        let s = self.model.services.values().find(|s| s.name == name).with_context(|| format!("no service {name}"))?;
        Ok(SocketAddr::new(*s.vips.first().context("service without a VIP")?, port))
    }
}

impl Drop for Ambient {
    fn drop(&mut self) {
        self.agents.clear();
        self.cnis.clear();
        if let Some(c) = self.controller.take() {
            self.rt.block_on(c.stop());
        }
    }
}

/// One mini-cluster pod per workload of the model, on the node the YAML names, with the
/// address the YAML gives it (the mini-cluster allocates them in the same order).
fn create_pods(cluster: &mut Cluster, model: &Model) -> Result<Vec<(Pod, String)>> {
    let mut pods = Vec::new();
    for (i, node) in NODES.iter().enumerate() {
        let mut ws: Vec<_> = model.workloads.values().filter(|w| w.node == *node).collect();
        ws.sort_by_key(|w| w.addresses.first().copied());
        for w in ws {
            let pod = cluster.add_pod(i, &w.name)?;
            ensure!(
                w.addresses.contains(&pod.ip4().into()),
                "pod {} got {} but the YAML gives it {:?}",
                w.name,
                pod.ip4(),
                w.addresses
            );
            pods.push((pod, w.service_account.clone()));
        }
    }
    Ok(pods)
}
