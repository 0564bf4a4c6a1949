//! The mini-cluster: a fabric netns with a bridge, node namespaces routed to
//! each other over it, and pod namespaces (plus cgroups) hanging off each
//! node's `br0`.
//!
//! Address plan (repeats freely across clusters, each lives in its own netns):
//! - node `n` underlay: `192.168.255.{n+1}/24`, `fd00:ff::{n+1}/64` (`eth0`)
//! - node `n` pod gateway on `br0`: `10.244.{n}.1/24`, `fd00:244:{n}::1/64`
//! - pod `k` (0-based, per node) on node `n`: `10.244.{n}.{k+10}/24`,
//!   `fd00:244:{n}::{k+10}/64` (the decimal digits of `k+10` as written, i.e.
//!   pod 0 is `fd00:244:0::10`, mirroring the IPv4 address)

use std::fs::File;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

use crate::cgroup::{cgroup2_root, create_cgroup, remove_cgroup_tree};
use crate::cmd::ip_in;
use crate::netns::{
    create_netns, delete_netns, in_netns, run_async_in_netns, set_sysctls, spawn_in_netns, spawn_in_netns_cmd,
    wait_link_up, wait_no_tentative,
};
use crate::sweep::{new_prefix, sweep_leftovers};

/// Name of the bridge in the fabric netns and in every node netns.
const BRIDGE: &str = "br0";
/// Name of the node's underlay interface and of each pod's interface.
const ETH: &str = "eth0";
/// First host octet used for pods on a node.
const POD_HOST_BASE: usize = 10;

/// Underlay IPv4 address of node `n`.
fn underlay4(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 255, (n + 1) as u8)
}

/// Underlay IPv6 address of node `n`.
fn underlay6(n: usize) -> Ipv6Addr {
    format!("fd00:ff::{}", n + 1).parse().expect("valid v6")
}

/// A set of nodes and pods, each in its own network namespace.
///
/// Why: end-to-end tests of the mesh need real kernels paths (veths, bridges,
/// routing, cgroups) without a real Kubernetes. Dropping the cluster removes
/// every namespace and cgroup it created.
pub struct Cluster {
    prefix: String,
    fabric: Option<File>,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    /// Pods ever added per node (indexes are never reused: a removed pod's veth and
    /// addresses may live on while something holds its netns).
    pods_added: std::collections::BTreeMap<usize, usize>,
    /// Every netns name created so far, in creation order (for cleanup).
    netns_names: Vec<String>,
    /// Cluster cgroup directory, once created.
    cgroup: Option<PathBuf>,
}

impl Cluster {
    /// Builds a cluster with `nodes` nodes, fully configured and settled.
    ///
    /// Why: one call gives a test a routed multi-node topology; it first
    /// sweeps leftovers of dead test processes. On error everything created so
    /// far is removed and the error names the failing command and its stderr.
    pub fn new(nodes: usize) -> Result<Cluster> {
        if nodes == 0 || nodes > 250 {
            bail!("Cluster::new: node count must be 1..=250, got {nodes}");
        }
        sweep_leftovers();
        let mut c = Cluster {
            prefix: new_prefix(),
            fabric: None,
            nodes: Vec::new(),
            pods: Vec::new(),
            pods_added: Default::default(),
            netns_names: Vec::new(),
            cgroup: None,
        };
        c.build(nodes).with_context(|| format!("building cluster {}", c.prefix))?;
        Ok(c)
    }

    fn build(&mut self, nodes: usize) -> Result<()> {
        let root = cgroup2_root()?;
        let cg = root.join(&self.prefix);
        create_cgroup(&cg)?;
        self.cgroup = Some(cg);

        let fabric_name = format!("{}-fabric", self.prefix);
        let fabric = create_netns(&fabric_name)?;
        self.netns_names.push(fabric_name.clone());
        self.fabric = Some(fabric);
        ip_in(&fabric_name, &["link", "add", BRIDGE, "type", "bridge"])?;
        ip_in(&fabric_name, &["link", "set", BRIDGE, "up"])?;

        for n in 0..nodes {
            let name = format!("{}-node{n}", self.prefix);
            let file = create_netns(&name)?;
            self.netns_names.push(name.clone());
            set_sysctls(&file, &[("net/ipv4/ip_forward", "1"), ("net/ipv6/conf/all/forwarding", "1")])?;
            let fabric_port = format!("n{n}");
            ip_in(&name, &["link", "add", ETH, "type", "veth", "peer", "name", &fabric_port, "netns", &fabric_name])?;
            ip_in(&fabric_name, &["link", "set", &fabric_port, "master", BRIDGE, "up"])?;
            ip_in(&name, &["addr", "add", &format!("{}/24", underlay4(n)), "dev", ETH])?;
            ip_in(&name, &["-6", "addr", "add", &format!("{}/64", underlay6(n)), "dev", ETH, "nodad"])?;
            ip_in(&name, &["link", "set", ETH, "up"])?;

            let gw4 = Ipv4Addr::new(10, 244, n as u8, 1);
            let gw6: Ipv6Addr = format!("fd00:244:{n}::1").parse()?;
            ip_in(&name, &["link", "add", BRIDGE, "type", "bridge"])?;
            ip_in(&name, &["addr", "add", &format!("{gw4}/24"), "dev", BRIDGE])?;
            ip_in(&name, &["-6", "addr", "add", &format!("{gw6}/64"), "dev", BRIDGE, "nodad"])?;
            ip_in(&name, &["link", "set", BRIDGE, "up"])?;

            self.nodes.push(Node {
                inner: Arc::new(NodeInner {
                    index: n,
                    netns_name: name,
                    netns: file,
                    gateway4: gw4,
                    gateway6: gw6,
                    underlay4: underlay4(n),
                    underlay6: underlay6(n),
                }),
            });
        }

        // Routes to every other node's pod CIDRs via its underlay address.
        for n in 0..nodes {
            let name = self.nodes[n].netns_name().to_string();
            for m in (0..nodes).filter(|&m| m != n) {
                ip_in(&name, &["route", "add", &format!("10.244.{m}.0/24"), "via", &underlay4(m).to_string()])?;
                ip_in(&name, &["-6", "route", "add", &format!("fd00:244:{m}::/64"), "via", &underlay6(m).to_string()])?;
            }
        }

        for n in 0..nodes {
            wait_link_up(&fabric_name, &format!("n{n}"))?;
            wait_link_up(self.nodes[n].netns_name(), ETH)?;
            wait_no_tentative(self.nodes[n].netns_name())?;
        }
        wait_no_tentative(&fabric_name)?;
        Ok(())
    }

    /// Adds a pod named `name` on node `node` and waits until it is usable.
    ///
    /// Why: pods are the unit the mesh enrolls; each gets its own netns
    /// (eth0 on the node's `br0`, default routes via the gateways) and its own
    /// cgroup `<cgroup2-root>/<prefix>/<name>`. `name` must be unique in the
    /// cluster and consist of `[A-Za-z0-9_.-]`.
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<Pod> {
        let n = node;
        let node = self.nodes.get(n).cloned().with_context(|| format!("add_pod({n}, {name:?}): no such node"))?;
        if name.is_empty()
            || name.len() > 64
            || name.starts_with('.')
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            bail!("add_pod: invalid pod name {name:?} (use 1-64 chars of [A-Za-z0-9_.-])");
        }
        if self.pods.iter().any(|p| p.name() == name) {
            bail!("add_pod: pod {name:?} already exists in cluster {}", self.prefix);
        }
        let k = self.pods_added.get(&n).copied().unwrap_or(0);
        let host = k + POD_HOST_BASE;
        if host > 254 {
            bail!("add_pod: node {n} is full");
        }
        self.pods_added.insert(n, k + 1);
        self.create_pod(&node, k, name)
            .with_context(|| format!("adding pod {name:?} on node {n} of cluster {}", self.prefix))
    }

    fn create_pod(&mut self, node: &Node, k: usize, name: &str) -> Result<Pod> {
        let n = node.index();
        let host = k + POD_HOST_BASE;
        let ns_name = format!("{}-pod-{name}", self.prefix);
        let file = create_netns(&ns_name)?;
        self.netns_names.push(ns_name.clone());

        let node_port = format!("v{k}");
        let node_ns = node.netns_name();
        ip_in(&ns_name, &["link", "add", ETH, "type", "veth", "peer", "name", &node_port, "netns", node_ns])?;
        ip_in(node_ns, &["link", "set", &node_port, "master", BRIDGE, "up"])?;

        let ip4 = Ipv4Addr::new(10, 244, n as u8, host as u8);
        let ip6: Ipv6Addr = format!("fd00:244:{n}::{host}").parse()?;
        ip_in(&ns_name, &["addr", "add", &format!("{ip4}/24"), "dev", ETH])?;
        ip_in(&ns_name, &["-6", "addr", "add", &format!("{ip6}/64"), "dev", ETH, "nodad"])?;
        ip_in(&ns_name, &["link", "set", ETH, "up"])?;
        ip_in(&ns_name, &["route", "add", "default", "via", &node.gateway4().to_string()])?;
        ip_in(&ns_name, &["-6", "route", "add", "default", "via", &node.gateway6().to_string(), "dev", ETH])?;

        let cgroup = self.cgroup.as_ref().context("cluster cgroup missing")?.join(name);
        create_cgroup(&cgroup)?;

        let pod = Pod {
            inner: Arc::new(PodInner {
                name: name.to_string(),
                uid: format!("{}-{name}", self.prefix),
                node: n,
                ip4,
                ip6,
                netns_name: ns_name.clone(),
                netns: file,
                cgroup,
            }),
        };
        // Registered before waiting so that Drop cleans up even on timeout.
        self.pods.push(pod.clone());

        wait_link_up(&ns_name, ETH)?;
        wait_link_up(node_ns, &node_port)?;
        wait_no_tentative(&ns_name)?;
        wait_no_tentative(node_ns)?;
        Ok(pod)
    }

    /// Deletes a pod as Kubernetes would once its sandbox is gone: kills its processes,
    /// removes its cgroup and its named netns (`/run/netns/<name>` disappears; the
    /// namespace itself lives on while something, such as an agent, holds it open).
    ///
    /// Why: tests of what happens to pods deleted while a component was down.
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<()> {
        let Some(i) = self.pods.iter().position(|p| p.uid() == pod.uid()) else {
            bail!("remove_pod: {} is not a pod of cluster {}", pod.name(), self.prefix);
        };
        let pod = self.pods.remove(i);
        remove_cgroup_tree(pod.cgroup_path())?;
        delete_netns(pod.netns_name())?;
        self.netns_names.retain(|n| n != pod.netns_name());
        Ok(())
    }

    /// The unique name prefix of this cluster (`zt{pid}x{counter}`).
    ///
    /// Why: lets tests find or assert on the namespaces/cgroups it owns.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Node `i`. Panics if out of range (a test bug).
    ///
    /// Why: tests address nodes by index, matching the address plan.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// All nodes, in index order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// All pods added so far, in creation order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Open fd of the fabric (underlay switch) netns.
    ///
    /// Why: lets tests observe or break the underlay (e.g. capture, link down).
    pub fn fabric_netns_file(&self) -> &File {
        self.fabric.as_ref().expect("fabric exists after Cluster::new")
    }

    /// Names of every netns this cluster created (fabric, nodes, pods).
    ///
    /// Why: cleanup assertions and debugging (`ip -n NAME ...`).
    pub fn netns_names(&self) -> &[String] {
        &self.netns_names
    }

    /// The per-cluster cgroup directory `<cgroup2-root>/<prefix>`.
    pub fn cgroup_path(&self) -> &Path {
        self.cgroup.as_deref().expect("cgroup exists after Cluster::new")
    }
}

impl Drop for Cluster {
    /// Kills processes left in pod cgroups, removes the cgroups, then deletes
    /// every netns. Never panics; problems are reported on stderr.
    fn drop(&mut self) {
        for pod in &self.pods {
            if let Err(e) = remove_cgroup_tree(pod.cgroup_path()) {
                eprintln!("mesh-tests: cleanup of {}: {e:#}", self.prefix);
            }
        }
        if let Some(cg) = &self.cgroup {
            if let Err(e) = remove_cgroup_tree(cg) {
                eprintln!("mesh-tests: cleanup of {}: {e:#}", self.prefix);
            }
        }
        for name in self.netns_names.iter().rev() {
            if let Err(e) = delete_netns(name) {
                eprintln!("mesh-tests: cleanup of {}: {e:#}", self.prefix);
            }
        }
    }
}

/// The port of each listening TCP socket in `netns` (v4 and v6; a port shared by several
/// sockets appears once per socket), read from the kernel's socket tables as seen from a
/// thread inside it.
pub fn listening_sockets(netns: &impl InNetns) -> Result<Vec<u16>> {
    netns.run(|| {
        let mut ports = Vec::new();
        for table in ["tcp", "tcp6"] {
            // thread-self: /proc/self/net would show the netns of the process's main thread.
            let path = format!("/proc/thread-self/net/{table}");
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                // local_address is ADDR:PORT in hex; state 0A is LISTEN.
                if cols.get(3) != Some(&"0A") {
                    continue;
                }
                let port = cols.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
                ports.push(port.ok_or_else(|| anyhow::anyhow!("bad line in {path}: {line}"))?);
            }
        }
        Ok(ports)
    })
}

/// Running code inside the network namespace of a [`Node`] or a [`Pod`].
///
/// Why: in-process clients, listeners and servers; sockets they create keep the
/// namespace. Every method but [`InNetns::netns_file`] is provided.
pub trait InNetns {
    /// Open fd (O_RDONLY) of the netns.
    fn netns_file(&self) -> &File;

    /// Runs `f` in the netns on a fresh thread and returns its result.
    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        in_netns(self.netns_file(), f)
    }

    /// Runs an async closure on a current-thread tokio runtime in the netns.
    ///
    /// Why: in-process async servers/clients without touching the caller's
    /// runtime or thread.
    fn run_async<F, Fut, R>(&self, f: F) -> R
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = R>,
        R: Send + 'static,
    {
        run_async_in_netns(self.netns_file(), f)
    }

    /// Runs `f` in the netns on a new thread without waiting for it.
    ///
    /// Why: long-lived in-process servers.
    fn spawn_thread<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> JoinHandle<R> {
        spawn_in_netns(self.netns_file(), f)
    }
}

struct NodeInner {
    index: usize,
    netns_name: String,
    netns: File,
    gateway4: Ipv4Addr,
    gateway6: Ipv6Addr,
    underlay4: Ipv4Addr,
    underlay6: Ipv6Addr,
}

/// A node: a netns with an underlay `eth0` and the pod bridge `br0`.
///
/// Why: the node is where the node-level proxy/agent runs and where kubelet
/// health probes originate. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

impl Node {
    /// Node index (0-based) in the cluster.
    pub fn index(&self) -> usize {
        self.inner.index
    }

    /// Netns name of the node (also usable with `ip -n`).
    pub fn name(&self) -> &str {
        &self.inner.netns_name
    }

    /// Netns name of the node (same as [`Node::name`]).
    pub fn netns_name(&self) -> &str {
        &self.inner.netns_name
    }

    /// The node's IPv4 address on `br0` (pods' gateway; kubelet probe source).
    pub fn gateway4(&self) -> Ipv4Addr {
        self.inner.gateway4
    }

    /// The node's IPv6 address on `br0` (pods' gateway; kubelet probe source).
    pub fn gateway6(&self) -> Ipv6Addr {
        self.inner.gateway6
    }

    /// The node's IPv4 underlay address (on `eth0`, towards other nodes).
    pub fn underlay4(&self) -> Ipv4Addr {
        self.inner.underlay4
    }

    /// The node's IPv6 underlay address (on `eth0`, towards other nodes).
    pub fn underlay6(&self) -> Ipv6Addr {
        self.inner.underlay6
    }

    /// Spawns a subprocess in the node netns (no cgroup change).
    ///
    /// Why: node-level daemons (e.g. the proxy binary) run in the node netns.
    pub fn spawn(&self, cmd: Command) -> Result<Child> {
        spawn_in_netns_cmd(self.netns_file(), None, cmd)
    }
}

impl InNetns for Node {
    /// Open fd of the node's netns.
    ///
    /// Why: pass to [`in_netns`] or to code that enters/attaches to the netns.
    fn netns_file(&self) -> &File {
        &self.inner.netns
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("index", &self.inner.index)
            .field("netns", &self.inner.netns_name)
            .field("gateway4", &self.inner.gateway4)
            .field("gateway6", &self.inner.gateway6)
            .finish()
    }
}

struct PodInner {
    name: String,
    uid: String,
    node: usize,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
    netns_name: String,
    netns: File,
    cgroup: PathBuf,
}

/// A pod: its own netns (`eth0` on the node's `br0`) and its own cgroup.
///
/// Why: the workload the mesh captures. Cheap to clone, `Send + Sync`, so it
/// can be moved into threads and async tasks.
#[derive(Clone)]
pub struct Pod {
    inner: Arc<PodInner>,
}

impl Pod {
    /// Pod name as given to [`Cluster::add_pod`].
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Unique id (`<prefix>-<name>`), unique across clusters and processes.
    ///
    /// Why: stands in for the Kubernetes pod UID when enrolling the pod.
    pub fn uid(&self) -> &str {
        &self.inner.uid
    }

    /// Index of the node the pod runs on.
    pub fn node(&self) -> usize {
        self.inner.node
    }

    /// The pod's IPv4 address.
    pub fn ip4(&self) -> Ipv4Addr {
        self.inner.ip4
    }

    /// The pod's IPv6 address.
    pub fn ip6(&self) -> Ipv6Addr {
        self.inner.ip6
    }

    /// Netns name of the pod (usable with `ip -n`).
    pub fn netns_name(&self) -> &str {
        &self.inner.netns_name
    }

    /// The pod's cgroup v2 directory.
    ///
    /// Why: cgroup-attached eBPF programs and identity lookups key on it.
    pub fn cgroup_path(&self) -> &Path {
        &self.inner.cgroup
    }

    /// Spawns a subprocess that joins the pod's cgroup and netns before exec.
    ///
    /// Why: real workloads (servers, curl) as pods would run them. Processes
    /// still running when the cluster is dropped are killed.
    pub fn spawn(&self, cmd: Command) -> Result<Child> {
        spawn_in_netns_cmd(self.netns_file(), Some(self.cgroup_path()), cmd)
    }
}

impl InNetns for Pod {
    /// Open fd (O_RDONLY) of the pod's netns.
    ///
    /// Why: what a CNI plugin would hand to the node agent for enrollment.
    fn netns_file(&self) -> &File {
        &self.inner.netns
    }
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("name", &self.inner.name)
            .field("uid", &self.inner.uid)
            .field("node", &self.inner.node)
            .field("ip4", &self.inner.ip4)
            .field("ip6", &self.inner.ip6)
            .finish()
    }
}
