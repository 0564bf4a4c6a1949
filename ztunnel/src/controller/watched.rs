//! The latest objects of every kind the live Kubernetes source watches, kept as already-parsed objects and turned
//! into the same [`Snapshot`] the YAML directory source produces, so the model, the status and the translation do
//! not know where objects came from.
//!
//! This part needs no API server and no `kube` crate, so it is compiled and tested in every build: the `kube`
//! feature's watchers (`controller::kube`) only feed [`aggregate`] what the API server lists and watches, as JSON.
//! Each object is parsed once, when it arrives, and a snapshot is a concatenation of the parses, so one pod
//! changing among 10,000 costs one parse.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::source::{parse_json_object, Snapshot};
use super::status::Origin;

/// One kind the live source lists and watches. Built-in kinds are always served; the others are CRDs, which a
/// cluster may not have installed (then there are none of that kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WatchedKind {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// The version watched (the objects are read at it).
    pub version: &'static str,
    /// The kind, as in `kind:` of the YAML source.
    pub kind: &'static str,
    /// The resource name in API paths.
    pub plural: &'static str,
    /// Whether objects of the kind live in a namespace (everything but Namespace).
    pub namespaced: bool,
    /// A Kubernetes built-in kind (not a CRD that may be missing).
    pub builtin: bool,
}

impl WatchedKind {
    const fn new(group: &'static str, kind: &'static str, plural: &'static str, builtin: bool) -> Self {
        WatchedKind { group, version: "v1", kind, plural, namespaced: true, builtin }
    }

    /// `v1`, `apps/v1`, `security.istio.io/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Every kind the YAML directory source reads, at the API version the live source watches it.
pub const WATCHED_KINDS: &[WatchedKind] = &[
    WatchedKind { namespaced: false, ..WatchedKind::new("", "Namespace", "namespaces", true) },
    WatchedKind { namespaced: false, ..WatchedKind::new("", "Node", "nodes", true) },
    WatchedKind::new("", "Pod", "pods", true),
    WatchedKind::new("", "Service", "services", true),
    WatchedKind::new("", "ServiceAccount", "serviceaccounts", true),
    WatchedKind::new("apps", "Deployment", "deployments", true),
    WatchedKind::new("security.istio.io", "AuthorizationPolicy", "authorizationpolicies", false),
    WatchedKind::new("security.istio.io", "PeerAuthentication", "peerauthentications", false),
    WatchedKind::new("networking.istio.io", "VirtualService", "virtualservices", false),
    WatchedKind::new("networking.istio.io", "DestinationRule", "destinationrules", false),
    WatchedKind::new("networking.istio.io", "ServiceEntry", "serviceentries", false),
    WatchedKind::new("networking.istio.io", "Gateway", "gateways", false),
    WatchedKind::new("gateway.networking.k8s.io", "Gateway", "gateways", false),
    WatchedKind::new("gateway.networking.k8s.io", "GRPCRoute", "grpcroutes", false),
    WatchedKind {
        version: "v1alpha2",
        ..WatchedKind::new("gateway.networking.k8s.io", "TCPRoute", "tcproutes", false)
    },
    WatchedKind {
        version: "v1beta1",
        ..WatchedKind::new("gateway.networking.k8s.io", "ReferenceGrant", "referencegrants", false)
    },
    WatchedKind::new("gateway.networking.k8s.io", "HTTPRoute", "httproutes", false),
];

/// `(namespace, name)` of an object (`""` namespace for cluster-scoped kinds).
type Key = (String, String);

/// What is known of one kind.
#[derive(Debug, Default)]
struct KindState {
    /// A full list has been received (or the kind is not served): the objects are complete.
    synced: bool,
    objects: BTreeMap<Key, Snapshot>,
}

/// The latest objects of every [`WATCHED_KINDS`] entry, each already parsed, and whether every kind has been listed
/// once (until then a snapshot would be partial, and publishing it would withdraw the rest from every node).
#[derive(Debug, Default)]
pub struct WatchedObjects {
    kinds: BTreeMap<WatchedKind, KindState>,
}

impl WatchedObjects {
    /// Nothing listed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A list of `kind` finished (the first one, or a re-list after the watch expired): `objects` are now all of
    /// that kind; any other is gone. An empty list also says a CRD is not installed.
    pub fn replace(&mut self, kind: &WatchedKind, objects: impl IntoIterator<Item = serde_json::Value>) {
        let objects = objects.into_iter().map(|v| convert(kind, v)).collect();
        self.kinds.insert(*kind, KindState { synced: true, objects });
    }

    /// An object of `kind` was added or changed.
    pub fn apply(&mut self, kind: &WatchedKind, object: serde_json::Value) {
        let (key, parsed) = convert(kind, object);
        self.kinds.entry(*kind).or_default().objects.insert(key, parsed);
    }

    /// An object of `kind` was deleted (only its metadata is read).
    pub fn delete(&mut self, kind: &WatchedKind, object: &serde_json::Value) {
        if let Some(state) = self.kinds.get_mut(kind) {
            state.objects.remove(&key(object));
        }
    }

    /// Whether every watched kind has been listed at least once.
    pub fn synced(&self) -> bool {
        WATCHED_KINDS.iter().all(|k| self.kinds.get(k).is_some_and(|s| s.synced))
    }

    /// How many objects (parsed or skipped) are held.
    pub fn len(&self) -> usize {
        self.kinds.values().map(|s| s.objects.len()).sum()
    }

    /// Whether no object is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything held, kind by kind in [`WATCHED_KINDS`] order, then by namespace and name: what the model is
    /// built from.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for state in WATCHED_KINDS.iter().filter_map(|k| self.kinds.get(k)) {
            for parsed in state.objects.values() {
                snapshot.objects.extend(parsed.objects.iter().cloned());
                snapshot.skipped.extend(parsed.skipped.iter().cloned());
            }
        }
        snapshot
    }
}

/// Reads one object of `kind` as served by the API: drops `metadata.managedFields` (large, never read), sets
/// `apiVersion` and `kind` (items of a list response leave them out), and parses it with the YAML source's parser.
pub fn convert(kind: &WatchedKind, mut object: serde_json::Value) -> (Key, Snapshot) {
    let key = key(&object);
    if let Some(map) = object.as_object_mut() {
        map.insert("apiVersion".into(), kind.api_version().into());
        map.insert("kind".into(), kind.kind.into());
        if let Some(meta) = map.get_mut("metadata").and_then(serde_json::Value::as_object_mut) {
            meta.remove("managedFields");
        }
    }
    let origin = Origin::kube(kind.kind, kind.group, &key.0, &key.1);
    (key, parse_json_object(origin, object))
}

fn key(object: &serde_json::Value) -> Key {
    let meta = |field: &str| object.pointer(&format!("/metadata/{field}")).and_then(|v| v.as_str()).unwrap_or("");
    (meta("namespace").to_string(), meta("name").to_string())
}

/// What one kind's watcher reports to [`aggregate`].
#[derive(Debug)]
pub enum Update {
    /// A complete list (the first, or a re-list); empty also when the kind is not served.
    Replace(Vec<serde_json::Value>),
    /// An object added or changed.
    Apply(serde_json::Value),
    /// An object deleted.
    Delete(serde_json::Value),
}

/// Applies every kind's updates to one [`WatchedObjects`] and publishes its snapshot on `snapshots`: nothing until
/// every kind has been listed once (a partial snapshot would withdraw the rest from every node), then `debounce`
/// after the first change of a burst, so a burst costs one model build and still lands within `debounce`. A
/// snapshot equal to the last one published (a change to fields the controller does not read, such as most pod
/// status updates) is not published. Returns when every sender is gone.
pub async fn aggregate(
    mut updates: mpsc::UnboundedReceiver<(WatchedKind, Update)>,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    debounce: Duration,
) {
    let mut objects = WatchedObjects::new();
    let mut due: Option<Instant> = None;
    loop {
        let next = match due {
            Some(at) => tokio::select! {
                u = updates.recv() => u,
                _ = tokio::time::sleep_until(at) => {
                    due = None;
                    let snapshot = objects.snapshot();
                    if snapshots.borrow().as_deref() != Some(&snapshot) {
                        tracing::debug!(objects = snapshot.objects.len(), skipped = snapshot.skipped.len(), "kubernetes: publishing");
                        snapshots.send_replace(Some(Arc::new(snapshot)));
                    }
                    continue;
                }
            },
            None => updates.recv().await,
        };
        let Some((kind, update)) = next else { return };
        match update {
            Update::Replace(list) => objects.replace(&kind, list),
            Update::Apply(o) => objects.apply(&kind, o),
            Update::Delete(o) => objects.delete(&kind, &o),
        }
        if objects.synced() && due.is_none() {
            due = Some(Instant::now() + debounce);
        }
    }
}
