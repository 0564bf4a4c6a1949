//! The live Kubernetes source (cargo feature `kube`): lists and watches, on an API server, every kind the YAML
//! directory source reads, and publishes the same [`Snapshot`] on every change, so a cluster drives the controller
//! exactly as a directory does. Only I/O lives here; turning objects into a snapshot is [`super::watched`], which is
//! pure and tested without an API server.
//!
//! Each kind has its own task: built-in kinds are watched directly; each Istio or Gateway API CRD is first looked up
//! by discovery, and a kind the cluster does not serve (404, or absent from its group) simply has no objects, and
//! is looked up again every [`REDISCOVER`]. A watch is `kube::runtime::watcher`: a list, then a watch from the
//! list's resource version, and a fresh list when the version expires (410), with backoff on errors. A (re)list
//! replaces the kind's objects once it is complete. [`aggregate`] gathers every kind's updates and publishes.
//!
//! NOT run against a real API server: none can be installed where this project is built and tested.
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use super::source::Snapshot;
use super::watched::{aggregate, Update, WatchedKind, WATCHED_KINDS};

/// How long changes are gathered after the first before a snapshot is published.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// How often a CRD the cluster does not serve is looked up again.
pub const REDISCOVER: Duration = Duration::from_secs(30);
/// Pause before retrying a failed discovery.
const RETRY: Duration = Duration::from_secs(2);

/// Watches of every kind, publishing a [`Snapshot`] of all of them after each burst of changes. Dropping it stops
/// the watches.
pub struct KubeWatch {
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeWatch {
    /// Starts listing and watching every kind through `client`.
    pub fn spawn(client: Client, debounce: Duration) -> Self {
        let (updates_tx, updates) = mpsc::unbounded_channel();
        let (snapshots_tx, snapshots) = watch::channel(None);
        let mut tasks: Vec<JoinHandle<()>> =
            WATCHED_KINDS.iter().map(|k| tokio::spawn(watch_kind(client.clone(), *k, updates_tx.clone()))).collect();
        tasks.push(tokio::spawn(aggregate(updates, snapshots_tx, debounce)));
        KubeWatch { snapshots, tasks }
    }

    /// The next snapshot newer than the last one returned (the first waits until every kind has been listed).
    /// `None` when the watches have stopped.
    pub async fn next(&mut self) -> Option<Arc<Snapshot>> {
        loop {
            self.snapshots.changed().await.ok()?;
            if let Some(s) = self.snapshots.borrow_and_update().clone() {
                return Some(s);
            }
        }
    }
}

impl Drop for KubeWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Resolves, lists and watches one kind for as long as the controller runs.
async fn watch_kind(client: Client, kind: WatchedKind, updates: mpsc::UnboundedSender<(WatchedKind, Update)>) {
    let name = kind_name(&kind);
    let send = |u: Update| updates.send((kind, u)).is_ok();
    let mut absent = false; // already reported as not served
    loop {
        let resource = match resolve(&client, &kind).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                if !absent {
                    info!(kind = %name, "kubernetes: kind not served by the cluster (CRD not installed); none of it");
                    if !send(Update::Replace(Vec::new())) {
                        return;
                    }
                    absent = true;
                }
                tokio::time::sleep(REDISCOVER).await;
                continue;
            }
            Err(e) => {
                warn!(kind = %name, error = %e, "kubernetes: discovery failed; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        absent = false;
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        tokio::pin!(stream);
        let mut listed = Vec::new();
        while let Some(event) = stream.next().await {
            let delivered = match event {
                Ok(Event::Init) => {
                    listed.clear();
                    true
                }
                Ok(Event::InitApply(o)) => {
                    listed.push(to_json(o));
                    true
                }
                Ok(Event::InitDone) => {
                    debug!(kind = %name, objects = listed.len(), "kubernetes: listed");
                    send(Update::Replace(std::mem::take(&mut listed)))
                }
                Ok(Event::Apply(o)) => send(Update::Apply(to_json(o))),
                Ok(Event::Delete(o)) => send(Update::Delete(to_json(o))),
                Err(e) if !kind.builtin && not_found(&e) => {
                    info!(kind = %name, "kubernetes: kind no longer served (CRD removed); none of it");
                    if !send(Update::Replace(Vec::new())) {
                        return;
                    }
                    absent = true;
                    break;
                }
                Err(e) => {
                    warn!(kind = %name, error = %e, "kubernetes: watch failed; retrying with backoff");
                    true
                }
            };
            if !delivered {
                return; // the aggregator is gone: the controller stopped
            }
        }
        tokio::time::sleep(REDISCOVER).await;
    }
}

/// The API resource of `kind`: fixed for built-in kinds; looked up by discovery for CRDs, `None` when the cluster
/// does not serve it.
async fn resolve(client: &Client, kind: &WatchedKind) -> Result<Option<ApiResource>, kube::Error> {
    let gvk = GroupVersionKind::gvk(kind.group, kind.version, kind.kind);
    if kind.builtin {
        return Ok(Some(ApiResource::from_gvk_with_plural(&gvk, kind.plural)));
    }
    match kube::discovery::pinned_kind(client, &gvk).await {
        Ok((resource, _)) => Ok(Some(resource)),
        Err(kube::Error::Api(status)) if status.code == 404 || status.is_not_found() => Ok(None),
        Err(kube::Error::Discovery(kube::error::DiscoveryError::MissingKind(_))) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a watch failed because the resource is not served (its CRD was deleted).
fn not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404 || s.is_not_found(),
        watcher::Error::WatchError(s) => s.code == 404 || s.is_not_found(),
        _ => false,
    }
}

/// The object as the API server sent it.
fn to_json(o: DynamicObject) -> serde_json::Value {
    serde_json::to_value(o).unwrap_or(serde_json::Value::Null)
}

/// `Pod`, `Gateway.gateway.networking.k8s.io`, for logs.
fn kind_name(kind: &WatchedKind) -> String {
    if kind.group.is_empty() {
        kind.kind.to_string()
    } else {
        format!("{}.{}", kind.kind, kind.group)
    }
}

/// The client `kubectl` would use: in-cluster service account, else `KUBECONFIG` / `~/.kube/config`.
pub async fn client() -> Result<Client, kube::Error> {
    Client::try_default().await
}
