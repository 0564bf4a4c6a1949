//! A `ztunnel controller` run in-process for a test, with its YAML directory and per-node
//! tokens, and the YAML snippets tests write into it: shared by the controller tests and
//! the CNI tests (which need the control plane to say which pods are ambient).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ztunnel::controller::{Controller, ControllerConfig, Options, Source};
use ztunnel::identity::{CaConfig, InProcessCa};

use crate::mesh::ControlPlaneAccess;
use crate::{Cluster, Pod};

/// A controller on its own runtime, with its YAML directory and token directory. Dropping
/// it stops the controller and removes the directory.
pub struct ControlPlane {
    rt: tokio::runtime::Runtime,
    controller: Option<Controller>,
    /// Holds `config/` (the YAML the controller reads) and `tokens/`.
    pub dir: PathBuf,
    /// How node agents (and `ztunnel cni`) reach it.
    pub access: ControlPlaneAccess,
    ca: Arc<InProcessCa>,
}

impl ControlPlane {
    /// The directory a cluster's control plane uses (under the system temp dir).
    pub fn dir_for(cluster: &Cluster) -> PathBuf {
        std::env::temp_dir().join(format!("{}-controller", cluster.prefix()))
    }

    /// Starts a controller on an ephemeral localhost port reading `dir/config`.
    pub fn start(dir: &Path) -> ControlPlane {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let ca = Arc::new(InProcessCa::new(CaConfig::new("cluster.local")).unwrap());
        let tokens = dir.join("tokens");
        let controller = rt.block_on(Controller::start(config(dir, "127.0.0.1:0".parse().unwrap(), ca.clone())));
        let controller = controller.expect("controller starts");
        let access = ControlPlaneAccess {
            address: controller.addr(),
            root_pem: controller.root_pem().into(),
            tokens_dir: tokens,
            node_names: vec![],
        };
        ControlPlane { rt, controller: Some(controller), dir: dir.to_path_buf(), access, ca }
    }

    /// Starts a controller for `cluster` whose directory holds the `default` namespace,
    /// labelled ambient, and `pods` (each on the given node, its service account named after
    /// it): the set-up of the tests where our CNI enrolls pods into a node agent.
    pub fn start_ambient(cluster: &Cluster, pods: &[(&Pod, usize)]) -> ControlPlane {
        let dir = Self::dir_for(cluster);
        let _ = std::fs::remove_dir_all(&dir);
        write_config(&dir, "namespace.yaml", &namespace_yaml(true));
        let yaml: String = pods.iter().map(|(p, n)| pod_yaml(p, cluster.node(*n).name(), p.name())).collect();
        write_config(&dir, "pods.yaml", &yaml);
        Self::start(&dir)
    }

    /// The running controller.
    pub fn controller(&self) -> &Controller {
        self.controller.as_ref().expect("controller running")
    }

    /// Stops the controller (the directory stays).
    pub fn stop(&mut self) {
        if let Some(c) = self.controller.take() {
            self.rt.block_on(c.stop());
        }
    }

    /// Starts again on the same address, with the same CA and tokens.
    pub fn restart(&mut self) {
        let cfg = config(&self.dir, self.access.address, self.ca.clone());
        self.controller = Some(self.rt.block_on(Controller::start(cfg)).expect("controller restarts"));
    }

    /// Writes (atomically) one file of the YAML directory.
    pub fn write(&self, file: &str, text: &str) {
        write_config(&self.dir, file, text)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(dir: &Path, listen: SocketAddr, ca: Arc<InProcessCa>) -> ControllerConfig {
    ControllerConfig {
        source: Source::Directory(dir.join("config")),
        listen,
        options: Options::default(),
        ca,
        tokens_dir: dir.join("tokens"),
        poll_interval: Duration::from_millis(100),
    }
}

/// A `kind: Pod` in namespace `default` for a mini-cluster pod on node `node`.
pub fn pod_yaml(pod: &Pod, node: &str, sa: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    app: {name}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers:\n  - name: app\n    image: app\nstatus:\n  podIP: {ip4}\n  podIPs:\n  - ip: {ip4}\n  - ip: {ip6}\n---\n",
        name = pod.name(),
        ip4 = pod.ip4(),
        ip6 = pod.ip6(),
    )
}

/// The `default` namespace, labelled `istio.io/dataplane-mode: ambient` or not.
pub fn namespace_yaml(ambient: bool) -> String {
    let label = if ambient { "\n  labels:\n    istio.io/dataplane-mode: ambient" } else { "" };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default{label}\n")
}

/// Writes `dir/config/file` atomically (the controller never reads half a file).
pub fn write_config(dir: &Path, file: &str, text: &str) {
    let config = dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    let tmp = config.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, config.join(file)).unwrap();
}
