//! A running `ztunnel controller`: watches its source (a YAML directory, or a live API server
//! with the `kube` feature), rebuilds the model and the xDS resources on every change, and
//! serves them (with the CA) over TLS. Both sources produce the same snapshot of objects, so
//! everything from the model on is shared. Node agents
//! authenticate with a per-node bearer token; the CA signs only identities of pods scheduled
//! on the asking node, read from the current model.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use ztunnel_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

use super::ads::{AdsServer, ResourceSnapshot, VersionedResource};
use super::ca::{CaServer, NodeAuthorizer};
use super::dir_events::DirEvents;
use super::grpc::{serve, Authenticator, ServerTlsMaterial, CONTROLLER_DNS_NAME};
use super::source::Snapshot;
use super::{translate, Model, Options, StatusEntry};
use crate::identity::{Identity, InProcessCa};

/// Where the controller reads Kubernetes objects from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Directory (or file) of Kubernetes YAML, re-read when it changes (checked on each
    /// inotify event and every [`ControllerConfig::poll_interval`]).
    Directory(PathBuf),
    /// A live API server, found as `kubectl` finds it (in-cluster service account, else
    /// `KUBECONFIG` / `~/.kube/config`), listed and watched (see [`super::kube`]). Start waits
    /// until every kind has been listed once.
    #[cfg(feature = "kube")]
    Kubernetes,
}

/// What the controller serves and from where.
pub struct ControllerConfig {
    /// Where the Kubernetes objects come from.
    pub source: Source,
    /// gRPC (ADS + CA) listener.
    pub listen: SocketAddr,
    /// Trust domain, cluster id, root namespace.
    pub options: Options,
    /// Signs workload certificates and the controller's own serving certificate.
    pub ca: Arc<InProcessCa>,
    /// One token file per node (file name = node name), created for every node the model
    /// schedules pods on; a node agent presents its file's content as its bearer token.
    pub tokens_dir: PathBuf,
    /// How often a [`Source::Directory`] is checked for changes.
    pub poll_interval: Duration,
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("serving certificate: {0}")]
    Tls(#[from] super::grpc::TlsMaterialError),
    /// No Kubernetes client configuration, or the watches stopped before the first full list.
    #[cfg(feature = "kube")]
    #[error("kubernetes: {0}")]
    Kubernetes(String),
}

/// A started source: what it will deliver after the initial load.
enum Updates {
    /// The directory, the reader that already holds its parsed files, the fingerprint taken
    /// before that first read (so an edit made during it is still seen as a change), and the
    /// inotify watches set up before both (none: polling only).
    Directory(PathBuf, super::source::CachedReader, u64, Option<DirEvents>),
    #[cfg(feature = "kube")]
    Kubernetes(super::kube::KubeWatch),
}

/// Handle to a running controller; dropping it stops serving.
pub struct Controller {
    addr: SocketAddr,
    root_pem: String,
    ads: AdsServer,
    ca: CaServer,
    model: Arc<RwLock<Arc<Model>>>,
    stop: Option<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

type Tokens = Arc<RwLock<HashMap<String, String>>>;

impl Controller {
    /// Loads the source (for Kubernetes: waits for the first full list), binds the listener
    /// and starts serving.
    pub async fn start(cfg: ControllerConfig) -> Result<Self, ControllerError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ControllerError::Io { path, source }
        };
        let (model, updates) = match &cfg.source {
            Source::Directory(dir) => {
                let events = DirEvents::new(dir)
                    .inspect_err(|e| warn!(dir = %dir.display(), error = %e, "no inotify; polling only"))
                    .ok();
                let fingerprint = super::fingerprint(dir);
                let mut reader = super::source::CachedReader::default();
                let objects = reader.read_dir(dir).map_err(io(dir))?;
                (
                    Model::build(objects, cfg.options.clone()),
                    Updates::Directory(dir.clone(), reader, fingerprint, events),
                )
            }
            #[cfg(feature = "kube")]
            Source::Kubernetes => {
                let kube_err = |e: &dyn std::fmt::Display| ControllerError::Kubernetes(e.to_string());
                let client = super::kube::client().await.map_err(|e| kube_err(&e))?;
                let mut watch = super::kube::KubeWatch::spawn(client, super::kube::DEBOUNCE);
                info!("waiting for the first list of every kind from the API server");
                let first = watch.next().await.ok_or_else(|| kube_err(&"watches stopped before the first list"))?;
                (Model::build((*first).clone(), cfg.options.clone()), Updates::Kubernetes(watch))
            }
        };
        report(&model, &[]);
        std::fs::create_dir_all(&cfg.tokens_dir).map_err(io(&cfg.tokens_dir))?;
        let tokens: Tokens = Arc::default();
        refresh_tokens(&cfg.tokens_dir, &model, &tokens);
        let (tx, rx) = watch::channel(Arc::new(snapshot(&model, None, 1)));
        let model = Arc::new(RwLock::new(Arc::new(model)));
        let authenticator: Authenticator = {
            let tokens = tokens.clone();
            Arc::new(move |t: &str| tokens.read().unwrap_or_else(|e| e.into_inner()).get(t).cloned())
        };
        let authorizer: NodeAuthorizer = {
            let model = model.clone();
            Arc::new(move |node: &str, id: &Identity| {
                let m = model.read().unwrap_or_else(|e| e.into_inner()).clone();
                may_hold(&m, node, id)
            })
        };
        let ads = AdsServer::new(rx).with_authenticator(authenticator.clone());
        let ca = CaServer::new(cfg.ca.clone(), authenticator, authorizer);
        let listener = TcpListener::bind(cfg.listen).await.map_err(io(Path::new(&cfg.listen.to_string())))?;
        let addr = listener.local_addr().map_err(io(Path::new(&cfg.listen.to_string())))?;
        let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        if !addr.ip().is_unspecified() {
            ips.push(addr.ip());
        }
        let tls = ServerTlsMaterial::issue(&cfg.ca, &[CONTROLLER_DNS_NAME, "localhost"], &ips)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = {
            let (ads, ca) = (ads.clone(), ca.clone());
            tokio::spawn(async move {
                if let Err(e) = serve(listener, tls, ads, ca, async move { drop(stopped.await) }).await {
                    warn!(error = %e, "controller gRPC server ended");
                }
            })
        };
        let cfg_root_pem = cfg.ca.trust_bundle().to_pem();
        let publisher = Publisher {
            options: cfg.options,
            tokens_dir: cfg.tokens_dir,
            model: model.clone(),
            tokens,
            tx,
            version: 1,
        };
        let watcher = match updates {
            Updates::Directory(dir, reader, fingerprint, events) => {
                tokio::spawn(watch_dir(dir, reader, fingerprint, events, cfg.poll_interval, publisher))
            }
            #[cfg(feature = "kube")]
            Updates::Kubernetes(watch) => tokio::spawn(watch_kube(watch, publisher)),
        };
        info!(%addr, "controller serving");
        Ok(Controller { addr, root_pem: cfg_root_pem, ads, ca, model, stop: Some(stop), tasks: vec![server, watcher] })
    }

    /// The bound gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM of the root that signs the serving certificate and every workload certificate.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Every object's outcome in the current model (what `ztunnel controller --check` lists).
    pub fn status(&self) -> Vec<StatusEntry> {
        self.model.read().unwrap_or_else(|e| e.into_inner()).status().to_vec()
    }

    /// The Gateway API route conditions per route and parentRef in the current model (what
    /// `ztunnel controller --check` lists after the objects).
    pub fn route_conditions(&self) -> Vec<super::RouteConditions> {
        self.model.read().unwrap_or_else(|e| e.into_inner()).route_conditions().to_vec()
    }

    /// `/config_dump` for `ztunnel ctl`: what the controller serves, as agents will read it.
    pub fn config_dump(&self) -> serde_json::Value {
        let model = self.model();
        let conditions = model.route_conditions().iter().map(|c| c.to_string()).collect();
        super::dump::config_dump(&model, conditions)
    }

    /// The current model.
    pub fn model(&self) -> Arc<Model> {
        self.model.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// ADS counters (clients, pushes, NACKs).
    pub fn ads(&self) -> &AdsServer {
        &self.ads
    }

    /// CA counters (issued, refusals by reason).
    pub fn ca(&self) -> &CaServer {
        &self.ca
    }

    /// Stops serving: open ADS streams end, and node agents keep their last state.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The resources of `model`, as the ADS server publishes them. Every workload, service and
/// policy equal to the one in `prev`'s model keeps `prev`'s encoded, hashed resource, so a
/// small edit re-translates only what it changed (a full translation of 10,000 workloads
/// costs about 90 ms; see docs/decisions.md). The models and the previous resources are all
/// ordered by name, so they are walked side by side rather than looked up name by name.
pub(super) fn snapshot(model: &Model, prev: Option<(&Model, &ResourceSnapshot)>, version: u64) -> ResourceSnapshot {
    let prev = prev.filter(|(m, _)| m.options == model.options);
    let network = &model.options.network;
    let previous = |type_url: &str| prev.and_then(|(_, s)| s.resources(type_url));
    let mut snap = ResourceSnapshot::new(version);
    let mut addresses = Vec::with_capacity(model.workloads.len() + model.services.len());
    // A workload the model took over from the previous build is the same `Arc`, which `==` on `Arc<Workload>`
    // (`Workload: Eq`) sees without comparing fields.
    carry_over(
        &model.workloads,
        prev.map(|(m, _)| &m.workloads),
        previous(ADDRESS_TYPE_URL),
        |w| translate::workload_any(w),
        &mut addresses,
    );
    carry_over(
        &model.services,
        prev.map(|(m, _)| &m.services),
        previous(ADDRESS_TYPE_URL),
        |s| translate::service_any(s, network),
        &mut addresses,
    );
    snap.set_type(ADDRESS_TYPE_URL, addresses.into_iter().collect());
    let mut policies = Vec::with_capacity(model.authorizations.len());
    carry_over(
        &model.authorizations,
        prev.map(|(m, _)| &m.authorizations),
        previous(AUTHORIZATION_TYPE_URL),
        |a| translate::to_any(AUTHORIZATION_TYPE_URL, &translate::authorization(a)),
        &mut policies,
    );
    snap.set_type(AUTHORIZATION_TYPE_URL, policies.into_iter().collect());
    snap
}

/// Appends the resource of each of `items` to `out`: the one in `prev_resources` when the item equals its
/// namesake in `prev_items`, else `translate`d anew. All three maps are read in name order, in one pass.
fn carry_over<T: PartialEq>(
    items: &BTreeMap<String, T>,
    prev_items: Option<&BTreeMap<String, T>>,
    prev_resources: Option<&BTreeMap<String, Arc<VersionedResource>>>,
    translate: impl Fn(&T) -> prost_types::Any,
    out: &mut Vec<(String, Arc<VersionedResource>)>,
) {
    let mut before = Seek(prev_items.into_iter().flatten().peekable());
    let mut resources = Seek(prev_resources.into_iter().flatten().peekable());
    for (name, item) in items {
        let kept = before
            .to(name)
            .filter(|b| item == *b)
            .and_then(|_| resources.to(name))
            .cloned()
            .unwrap_or_else(|| Arc::new(VersionedResource::new(translate(item))));
        out.push((name.clone(), kept));
    }
}

/// A forward-only lookup in a map iterated in key order, for keys asked in ascending order.
struct Seek<I: Iterator>(std::iter::Peekable<I>);

impl<'a, V, I: Iterator<Item = (&'a String, V)>> Seek<I> {
    /// The value at `key`, skipping smaller keys.
    fn to(&mut self, key: &str) -> Option<V> {
        while let Some((k, _)) = self.0.peek() {
            match k.as_str().cmp(key) {
                std::cmp::Ordering::Less => drop(self.0.next()),
                std::cmp::Ordering::Equal => return self.0.next().map(|(_, v)| v),
                std::cmp::Ordering::Greater => return None,
            }
        }
        None
    }
}

/// Istio's node authorization: `node` may hold `id` only if a pod with that namespace and
/// service account is scheduled on it.
fn may_hold(model: &Model, node: &str, id: &Identity) -> Result<(), String> {
    let on_node = model
        .workloads
        .values()
        .any(|w| w.node == node && w.namespace == id.namespace() && w.service_account == id.service_account());
    if on_node {
        Ok(())
    } else {
        Err(format!("node {node} may not hold {id}: no pod with that service account is scheduled on it"))
    }
}

/// Logs the objects whose status is an error and were not in `before`.
fn report(model: &Model, before: &[StatusEntry]) {
    for e in model.status().iter().filter(|e| e.outcome.is_error() && !before.contains(e)) {
        warn!(status = %e, "object rejected; the rest applies");
    }
}

/// Makes sure every node the model schedules pods on has a token file, and loads all of
/// them (token → node).
fn refresh_tokens(dir: &Path, model: &Model, tokens: &Tokens) {
    let nodes: std::collections::BTreeSet<&str> =
        model.workloads.values().map(|w| w.node.as_str()).filter(|n| !n.is_empty()).collect();
    for node in nodes {
        let path = dir.join(node);
        if node.contains('/') || node.starts_with('.') || path.exists() {
            continue;
        }
        let token = random_token();
        if let Err(e) = write_private(&path, &token) {
            warn!(path = %path.display(), error = %e, "cannot write node token");
        }
    }
    let mut map = HashMap::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let (Ok(token), Some(node)) = (std::fs::read_to_string(e.path()), e.file_name().to_str().map(String::from))
            else {
                continue;
            };
            if !token.trim().is_empty() {
                map.insert(token.trim().to_string(), node);
            }
        }
    }
    *tokens.write().unwrap_or_else(|e| e.into_inner()) = map;
}

fn random_token() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 24];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(content.as_bytes())
}

/// How long a replaced model is kept before it is freed (see [`Publisher::publish`]).
const RETIRE_AFTER: Duration = Duration::from_millis(300);

/// Turns each new snapshot of objects into the model, the node tokens and the published
/// resources: the part both sources share.
struct Publisher {
    options: Options,
    tokens_dir: PathBuf,
    model: Arc<RwLock<Arc<Model>>>,
    tokens: Tokens,
    tx: watch::Sender<Arc<ResourceSnapshot>>,
    version: u64,
}

impl Publisher {
    /// Builds the model of `objects` (whose reading began at `started`) and pushes it.
    fn publish(&mut self, objects: Snapshot, started: std::time::Instant) {
        let read = started.elapsed();
        let prev_model = self.model.read().unwrap_or_else(|e| e.into_inner()).clone();
        let next = Model::build_after(objects, self.options.clone(), Some(&prev_model));
        let built = started.elapsed();
        report(&next, prev_model.status());
        refresh_tokens(&self.tokens_dir, &next, &self.tokens);
        self.version += 1;
        let version = self.version;
        let translating = std::time::Instant::now();
        let prev_snap = self.tx.borrow().clone();
        let snap = snapshot(&next, Some((&prev_model, &prev_snap)), version);
        info!(
            version,
            workloads = next.workloads.len(),
            services = next.services.len(),
            policies = next.authorizations.len(),
            read_ms = read.as_millis() as u64,
            model_ms = (built - read).as_millis() as u64,
            translate_ms = translating.elapsed().as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "config changed; pushing"
        );
        // The model first: a node may ask for a new workload's certificate as soon as it sees it. Freeing the old
        // model and snapshot (tens of thousands of strings) waits until the push is out: it took 20 ms of the
        // edit's path at 10,000 workloads.
        // (`prev_model` and `prev_snap` are the same `Arc`s as the ones replaced here.)
        drop((prev_model, prev_snap));
        let old = std::mem::replace(&mut *self.model.write().unwrap_or_else(|e| e.into_inner()), Arc::new(next));
        let old_snap = self.tx.send_replace(Arc::new(snap));
        let retired = (old, old_snap);
        tokio::spawn(async move {
            tokio::time::sleep(RETIRE_AFTER).await;
            let _ = tokio::task::spawn_blocking(move || drop(retired)).await;
        });
    }
}

/// Re-reads the directory whenever its fingerprint changes (from `last`, taken before the
/// read at start that filled `reader`) and publishes the new resources. Looks on every
/// inotify wake-up (`events`, watching since before that read) and every `poll_interval`
/// (the fallback).
async fn watch_dir(
    dir: PathBuf,
    mut reader: super::source::CachedReader,
    mut last: u64,
    mut events: Option<DirEvents>,
    poll_interval: Duration,
    mut publisher: Publisher,
) {
    loop {
        let woken = tokio::select! {
            _ = tokio::time::sleep(poll_interval) => false,
            _ = async { events.as_mut().expect("checked").changed().await }, if events.is_some() => true,
        };
        if let (true, Some(ev)) = (woken, &events) {
            // A new subdirectory wakes us before it holds any file: watch it now.
            let _ = ev.rewatch(&dir);
        }
        let fp = super::fingerprint(&dir);
        if fp == last {
            continue;
        }
        last = fp;
        let started = std::time::Instant::now();
        match reader.read_dir(&dir) {
            Ok(objects) => publisher.publish(objects, started),
            Err(e) => warn!(dir = %dir.display(), error = %e, "cannot read config; keeping the last state"),
        }
    }
}

/// Publishes every snapshot the API server watches produce. If the watches stop, the last
/// state stays served.
#[cfg(feature = "kube")]
async fn watch_kube(mut watch: super::kube::KubeWatch, mut publisher: Publisher) {
    while let Some(objects) = watch.next().await {
        publisher.publish((*objects).clone(), std::time::Instant::now());
    }
    warn!("kubernetes watches stopped; keeping the last state");
}
