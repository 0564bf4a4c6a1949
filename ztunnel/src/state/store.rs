//! Indexed, atomically replaced snapshots of the mesh state.
use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use super::config::{LocalConfig, Service, Workload, WorkloadProtocol};
use super::{parse_local_config, ConfigError};
use crate::policy::{InvalidPolicy, Policies};

/// One consistent view of workloads, services and policies.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub config: LocalConfig,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    by_uid: HashSet<ByUid>,
    /// `(namespace, name)` → Pod workloads of that name: enrollment names pods by their
    /// Kubernetes uid, while istiod names workloads `cluster//Pod/namespace/name`. Only Pod
    /// workloads are indexed (a WorkloadEntry or ServiceEntry workload of the same name must
    /// not lend a pod its policies), and all of them, so a name in two clusters is seen as
    /// ambiguous instead of last-one-wins.
    by_name: HashMap<String, HashMap<ByName, Vec<Arc<Workload>>>>,
    /// Where pods' own workloads must come from (see [`Scope`]).
    scope: Scope,
    vips: HashMap<IpAddr, Arc<Service>>,
    endpoints: HashMap<String, Vec<Arc<Workload>>>,
    rr: HashMap<String, AtomicUsize>,
}

/// A workload in an index keyed by one of its string fields, without a copy of that field: rebuilding the
/// indexes for 10,000 workloads allocated one string per workload and key.
struct Keyed<F: KeyField>(Arc<Workload>, std::marker::PhantomData<F>);

/// Which field a [`Keyed`] index uses.
trait KeyField {
    fn of(w: &Workload) -> &str;
}

/// By uid.
struct Uid;
impl KeyField for Uid {
    fn of(w: &Workload) -> &str {
        &w.uid
    }
}

/// By name (in a per-namespace index).
struct Name;
impl KeyField for Name {
    fn of(w: &Workload) -> &str {
        &w.name
    }
}

type ByUid = Keyed<Uid>;
type ByName = Keyed<Name>;

impl<F: KeyField> Keyed<F> {
    fn new(w: &Arc<Workload>) -> Self {
        Keyed(w.clone(), std::marker::PhantomData)
    }
}

impl<F: KeyField> std::fmt::Debug for Keyed<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(F::of(&self.0))
    }
}

impl<F: KeyField> Borrow<str> for Keyed<F> {
    fn borrow(&self) -> &str {
        F::of(&self.0)
    }
}

impl<F: KeyField> Hash for Keyed<F> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        F::of(&self.0).hash(state)
    }
}

impl<F: KeyField> PartialEq for Keyed<F> {
    fn eq(&self, other: &Self) -> bool {
        F::of(&self.0) == F::of(&other.0)
    }
}

impl<F: KeyField> Eq for Keyed<F> {}

/// Where an outbound connection really goes.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The destination workload, when it is one the mesh knows.
    pub workload: Option<Arc<Workload>>,
    /// The service the client addressed, when it dialled a VIP.
    pub service: Option<Arc<Service>>,
    /// Address to reach (endpoint IP and target port); through a waypoint, the service
    /// VIP and port the client dialled (the waypoint routes it).
    pub addr: SocketAddr,
    /// The HBONE endpoint when it is not `addr`'s IP on 15008: the waypoint's.
    pub hbone_dst: Option<SocketAddr>,
}

impl Upstream {
    /// Whether to tunnel in HBONE (the destination is a mesh workload).
    pub fn is_hbone(&self) -> bool {
        // A waypoint always takes HBONE, whatever its own pod's enrollment.
        self.hbone_dst.is_some() || self.workload.as_ref().is_some_and(|w| w.protocol == WorkloadProtocol::Hbone)
    }
}

impl Snapshot {
    /// Builds the indexes for a validated config.
    pub fn new(config: LocalConfig) -> Self {
        Self::scoped(config, Scope::default())
    }

    /// Builds the indexes for a validated config, for the node and mode in `scope`.
    pub fn scoped(config: LocalConfig, scope: Scope) -> Self {
        let (w, n) = (config.workloads.len(), config.services.len());
        let mut s = Snapshot {
            scope,
            by_ip: HashMap::with_capacity(w),
            by_uid: HashSet::with_capacity(w),
            by_name: HashMap::new(),
            vips: HashMap::with_capacity(n),
            endpoints: HashMap::with_capacity(n),
            rr: HashMap::with_capacity(n),
            ..Snapshot::default()
        };
        for w in &config.workloads {
            let w = w.clone();
            for ip in &w.workload_ips {
                s.by_ip.insert(*ip, w.clone());
            }
            s.by_uid.replace(ByUid::new(&w)); // the last of a repeated uid wins, as in a map
            if is_pod_uid(&w) {
                let names = match s.by_name.get_mut(&w.namespace) {
                    Some(names) => names,
                    None => s.by_name.entry(w.namespace.clone()).or_default(),
                };
                names.entry(ByName::new(&w)).or_default().push(w.clone());
            }
            for key in w.services.keys() {
                match s.endpoints.get_mut(key) {
                    Some(members) => members.push(w.clone()),
                    None => drop(s.endpoints.insert(key.clone(), vec![w.clone()])),
                }
            }
        }
        for svc in &config.services {
            let svc = svc.clone();
            for ip in svc.vip_addrs().unwrap_or_default() {
                s.vips.insert(ip, svc.clone());
            }
            s.rr.insert(svc.key(), AtomicUsize::new(0));
        }
        s.config = config;
        s
    }

    /// The workload at an IP.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.by_ip.get(&ip).cloned()
    }

    /// The workload with a uid.
    pub fn workload_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.by_uid.get(uid).map(|w| w.0.clone())
    }

    /// The Pod workload named `name` in `namespace` that runs on this node (when the node
    /// is known on both sides). None when there is none, or when more than one would do:
    /// an ambiguous name must not pick one pod's policies at random.
    pub fn pod_workload(&self, namespace: &str, name: &str) -> Option<Arc<Workload>> {
        match self.find_pod(namespace, name) {
            PodMatch::Here(w) => Some(w),
            PodMatch::Ambiguous => {
                tracing::warn!(%namespace, %name, "more than one Pod workload with this name on this node: none is used");
                None
            }
            PodMatch::Elsewhere | PodMatch::Unknown => None,
        }
    }

    /// Where the Pod workloads named `name` in `namespace` are, from this node's view: when
    /// the node is known, a workload must name it to be here (one naming no node could be
    /// anywhere, so it is neither here nor elsewhere).
    pub fn find_pod(&self, namespace: &str, name: &str) -> PodMatch {
        let Some(candidates) = self.by_name.get(namespace).and_then(|names| names.get(name)) else {
            return PodMatch::Unknown;
        };
        let node = self.scope.node.as_str();
        let mut here = candidates.iter().filter(|w| node.is_empty() || w.node == node);
        match (here.next(), here.next()) {
            (Some(w), None) => PodMatch::Here(w.clone()),
            (Some(_), Some(_)) => PodMatch::Ambiguous,
            (None, _) if !node.is_empty() && candidates.iter().all(|w| !w.node.is_empty() && w.node != node) => {
                PodMatch::Elsewhere
            }
            (None, _) => PodMatch::Unknown,
        }
    }

    /// Whether a pod whose workload this snapshot lacks must be refused (xDS mode: the
    /// control plane describes every pod it enrolls, and a stand-in would carry none of
    /// the policies that select it).
    pub fn requires_workload(&self) -> bool {
        self.scope.require_workload
    }

    /// Policies in force, with the rejected entries that make the workloads they select fail closed.
    pub fn policies(&self) -> Policies<'_> {
        Policies { valid: &self.config.policies, invalid: &self.config.invalid_policies }
    }

    /// Policy entries that were rejected (each denies everything for the workloads it could select).
    pub fn invalid_policies(&self) -> &[InvalidPolicy] {
        &self.config.invalid_policies
    }

    /// Resolves a destination: service VIP → one endpoint (round robin), workload IP →
    /// that workload, anything else → passthrough.
    pub fn resolve(&self, dst: SocketAddr) -> Option<Upstream> {
        self.resolve_from(dst, None)
    }

    /// Like [`Snapshot::resolve`], for a client: a VIP of a service that uses a waypoint
    /// resolves to the waypoint (unless `from` is that waypoint's own workload), and to
    /// nothing when its waypoint cannot be found: skipping the waypoint would skip its policy.
    pub fn resolve_from(&self, dst: SocketAddr, from: Option<&Workload>) -> Option<Upstream> {
        let Some(svc) = self.vips.get(&dst.ip()) else {
            return Some(Upstream {
                workload: self.workload_by_ip(dst.ip()),
                service: None,
                addr: dst,
                hbone_dst: None,
            });
        };
        if let Some(wp) = &svc.waypoint {
            let (waypoint, ip) = self.waypoint_endpoint(svc, dst.ip())?;
            if from.is_none_or(|f| f.uid != waypoint.uid) {
                return Some(Upstream {
                    workload: Some(waypoint),
                    service: Some(svc.clone()),
                    addr: dst,
                    hbone_dst: Some(SocketAddr::new(ip, wp.hbone_mtls_port)),
                });
            }
        }
        let (ep, addr) = self.service_endpoint(svc, dst.ip(), dst.port(), |_| true)?;
        Some(Upstream { workload: Some(ep), service: Some(svc.clone()), addr, hbone_dst: None })
    }

    /// Every endpoint of `svc` that `keep` accepts, with its address for `port` (the service
    /// port mapped to the endpoint's target port) in `like`'s family, in a stable order: what
    /// a load balancer chooses among.
    pub fn service_endpoints(
        &self,
        svc: &Service,
        like: IpAddr,
        port: u16,
        keep: impl Fn(&Workload) -> bool,
    ) -> Vec<(Arc<Workload>, SocketAddr)> {
        let key = svc.key();
        let Some(eps) = self.endpoints.get(&key) else { return vec![] };
        eps.iter()
            .filter(|w| keep(w))
            .filter_map(|ep| {
                let target = match svc.ports.get(&port) {
                    Some(0) | None => ep.services.get(&key).and_then(|m| m.get(&port)).copied().unwrap_or(port),
                    Some(t) => *t,
                };
                let ip = pick_family(&ep.workload_ips, like)?;
                Some((ep.clone(), SocketAddr::new(ip, target)))
            })
            .collect()
    }

    /// One endpoint of `svc` that `keep` accepts (round robin), with its address for
    /// `port` (the service port mapped to the endpoint's target port), in `like`'s family.
    pub fn service_endpoint(
        &self,
        svc: &Service,
        like: IpAddr,
        port: u16,
        keep: impl Fn(&Workload) -> bool,
    ) -> Option<(Arc<Workload>, SocketAddr)> {
        let key = svc.key();
        let eps: Vec<&Arc<Workload>> = self.endpoints.get(&key)?.iter().filter(|w| keep(w)).collect();
        if eps.is_empty() {
            return None;
        }
        let i = self.rr.get(&key).map(|c| c.fetch_add(1, Ordering::Relaxed)).unwrap_or(0);
        let ep = eps[i % eps.len()].clone();
        let target = match svc.ports.get(&port) {
            Some(0) | None => ep.services.get(&key).and_then(|m| m.get(&port)).copied().unwrap_or(port),
            Some(t) => *t,
        };
        let ip = pick_family(&ep.workload_ips, like)?;
        Some((ep, SocketAddr::new(ip, target)))
    }

    /// The service with this hostname (FQDN, or a short name in `namespace`).
    pub fn service_by_host(&self, host: &str, namespace: &str) -> Option<Arc<Service>> {
        let services = &self.config.services;
        services
            .iter()
            .find(|s| s.hostname == host)
            .or_else(|| {
                let short = host.split('.').next().unwrap_or(host);
                let ns = host.split('.').nth(1).unwrap_or(namespace);
                services.iter().find(|s| s.name == short && s.namespace == ns)
            })
            .cloned()
    }

    /// The service a VIP belongs to.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<Arc<Service>> {
        self.vips.get(&ip).cloned()
    }

    /// Every workload that is `svc`'s waypoint (the pod at its address, or the endpoints of
    /// the waypoint's Service); empty when it has none.
    pub fn waypoint_of(&self, svc: &Service) -> Vec<Arc<Workload>> {
        let Some(wp) = &svc.waypoint else { return vec![] };
        let service = match (&wp.address, &wp.hostname) {
            (Some(ip), _) => match self.vips.get(ip) {
                Some(s) => s.clone(),
                None => return self.workload_by_ip(*ip).into_iter().collect(),
            },
            (None, Some(h)) => {
                let (ns, host) = h.split_once('/').unwrap_or(("", h));
                match self.config.services.iter().find(|s| s.hostname == host && (ns.is_empty() || s.namespace == ns)) {
                    Some(s) => s.clone(),
                    None => return vec![],
                }
            }
            (None, None) => return vec![],
        };
        self.endpoints.get(&service.key()).cloned().unwrap_or_default()
    }

    /// A waypoint pod of `svc` (round robin over [`Snapshot::waypoint_of`]) and its address
    /// in `like`'s family.
    fn waypoint_endpoint(&self, svc: &Service, like: IpAddr) -> Option<(Arc<Workload>, IpAddr)> {
        let pods = self.waypoint_of(svc);
        if pods.is_empty() {
            return None;
        }
        let i = self.rr.get(&svc.key()).map(|c| c.fetch_add(1, Ordering::Relaxed)).unwrap_or(0);
        let w = pods[i % pods.len()].clone();
        let ip = pick_family(&w.workload_ips, like)?;
        Some((w, ip))
    }
}

/// Whether `w` is a Kubernetes Pod by its uid (istiod's `cluster//Pod/namespace/name`), and
/// the uid names the same pod as its namespace and name fields.
fn is_pod_uid(w: &Workload) -> bool {
    let mut parts = w.uid.splitn(5, '/');
    let (_cluster, group, kind, ns, name) = (parts.next(), parts.next(), parts.next(), parts.next(), parts.next());
    group == Some("") && kind == Some("Pod") && ns == Some(w.namespace.as_str()) && name == Some(w.name.as_str())
}

/// Where a pod's workload is, by its namespace and name (see [`Snapshot::find_pod`]).
#[derive(Debug, Clone)]
pub enum PodMatch {
    /// Exactly one Pod workload of that name on this node.
    Here(Arc<Workload>),
    /// More than one on this node: none may be used.
    Ambiguous,
    /// Only on other nodes.
    Elsewhere,
    /// None known (or none whose node is known).
    Unknown,
}

/// Which node a snapshot serves and whether pods' workloads must come from it.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// This node's name ("" when unknown: pods are then matched by name alone).
    pub node: String,
    /// Refuse a pod's connections while its workload is absent (set in xDS mode).
    pub require_workload: bool,
}

fn pick_family(ips: &[IpAddr], like: IpAddr) -> Option<IpAddr> {
    ips.iter().find(|i| i.is_ipv4() == like.is_ipv4()).or_else(|| ips.first()).copied()
}

/// The live store: readers take cheap `Arc` snapshots; writers replace them whole.
#[derive(Debug)]
pub struct StateStore {
    current: RwLock<Arc<Snapshot>>,
    version: watch::Sender<u64>,
    rejected: AtomicU64,
    /// False until a control plane has delivered its first full state: until then the
    /// proxies refuse connections rather than decide on an empty (allow-all) policy set.
    synced: AtomicBool,
    scope: Scope,
}

impl Default for StateStore {
    fn default() -> Self {
        Self::new(LocalConfig::default())
    }
}

impl StateStore {
    /// A store starting from `config`.
    pub fn new(config: LocalConfig) -> Self {
        Self {
            current: RwLock::new(Arc::new(Snapshot::new(config))),
            version: watch::channel(0).0,
            rejected: AtomicU64::new(0),
            synced: AtomicBool::new(true),
            scope: Scope::default(),
        }
    }

    /// An empty store for node `node` that is not in force until [`Self::mark_synced`] (xDS
    /// mode), and in which a pod without a workload is refused.
    pub fn awaiting_sync(node: &str) -> Self {
        let scope = Scope { node: node.to_string(), require_workload: true };
        Self {
            current: RwLock::new(Arc::new(Snapshot::scoped(LocalConfig::default(), scope.clone()))),
            version: watch::channel(0).0,
            rejected: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            scope,
        }
    }

    /// The control plane's first full state has been applied.
    pub fn mark_synced(&self) {
        if !self.synced.swap(true, Ordering::AcqRel) {
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// Whether the state may be used to decide on connections.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the state; subscribers are told (e.g. to re-check open connections). Returns the replaced
    /// snapshot, so that a caller on a latency-sensitive path can free it later.
    pub fn replace(&self, config: LocalConfig) -> Arc<Snapshot> {
        let next = Arc::new(Snapshot::scoped(config, self.scope.clone()));
        let old = std::mem::replace(&mut *self.current.write().unwrap_or_else(|e| e.into_inner()), next);
        self.version.send_modify(|v| *v += 1);
        old
    }

    /// Applies a local-config document: good entries replace the state, bad ones are
    /// rejected by name (and counted). A document that is not YAML keeps the last state.
    pub fn apply_yaml(&self, text: &str) -> Vec<ConfigError> {
        let (cfg, errors) = parse_local_config(text);
        self.rejected.fetch_add(errors.len() as u64, Ordering::Relaxed);
        for e in &errors {
            tracing::warn!(error = %e, "config entry rejected");
        }
        for p in &cfg.invalid_policies {
            tracing::warn!(policy = %p.key(), reason = %p.reason, namespace = ?p.namespace, scope = ?p.scope,
                "invalid policy: the workloads it could select deny all connections until it is fixed");
        }
        if !errors.iter().any(|e| e.kind == "document") {
            self.replace(cfg);
        }
        errors
    }

    /// Entries rejected so far (for metrics).
    pub fn rejected_total(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Notifies on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(uid: &str, node: &str) -> Arc<Workload> {
        Arc::new(
            serde_yaml_ng::from_str(&format!(
                "uid: {uid}\nname: web\nnamespace: shop\nnode: '{node}'\nauthorizationPolicies: [shop/{uid}]\n"
            ))
            .unwrap(),
        )
    }

    fn snapshot(node: &str, workloads: Vec<Arc<Workload>>) -> Snapshot {
        let config = LocalConfig { workloads, ..LocalConfig::default() };
        Snapshot::scoped(config, Scope { node: node.into(), require_workload: true })
    }

    #[test]
    fn local_config_locality_wins_over_topology_labels_part_by_part() {
        let yaml = "workloads:\n- uid: a\n  name: a\n  namespace: ns\n  workloadIps: [10.0.0.1]\n  locality: {region: eu, zone: eu-1a}\n  labels: {topology.kubernetes.io/region: us, topology.istio.io/subzone: rack7}\n";
        let (config, errors) = super::super::parse_local_config(yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.workloads[0].locality(), ("eu", "eu-1a", "rack7"));
    }

    #[test]
    fn a_pod_is_not_given_a_workload_entry_of_the_same_name() {
        let entry = workload("c1/networking.istio.io/WorkloadEntry/shop/web", "node-a");
        let snap = snapshot("node-a", vec![entry]);
        assert!(snap.pod_workload("shop", "web").is_none());
    }

    #[test]
    fn a_pod_is_not_given_the_workload_of_a_pod_on_another_node() {
        let snap = snapshot("node-a", vec![workload("c1//Pod/shop/web", "node-b")]);
        assert!(snap.pod_workload("shop", "web").is_none());
        assert!(matches!(snap.find_pod("shop", "web"), PodMatch::Elsewhere));
    }

    #[test]
    fn a_pod_name_two_workloads_claim_on_this_node_matches_neither() {
        let snap =
            snapshot("node-a", vec![workload("c1//Pod/shop/web", "node-a"), workload("c2//Pod/shop/web", "node-a")]);
        assert!(snap.pod_workload("shop", "web").is_none());
        assert!(matches!(snap.find_pod("shop", "web"), PodMatch::Ambiguous), "ambiguous is not elsewhere");
    }

    #[test]
    fn a_pod_gets_its_own_pod_workload_on_this_node() {
        let snap =
            snapshot("node-a", vec![workload("c2//Pod/shop/web", "node-b"), workload("c1//Pod/shop/web", "node-a")]);
        assert_eq!(snap.pod_workload("shop", "web").unwrap().uid, "c1//Pod/shop/web");
    }

    #[test]
    fn a_pod_workload_naming_no_node_is_not_taken_when_the_node_is_known() {
        let snap = snapshot("node-a", vec![workload("c1//Pod/shop/web", "")]);
        assert!(snap.pod_workload("shop", "web").is_none());
    }

    #[test]
    fn a_uid_naming_another_pod_is_not_indexed_under_this_name() {
        let snap = snapshot("node-a", vec![workload("c1//Pod/shop/other", "node-a")]);
        assert!(snap.pod_workload("shop", "web").is_none());
    }
}
