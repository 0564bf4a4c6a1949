//! The controller's delta ADS server: pushes Address and Authorization resources to node agents
//! exactly as istiod serves Istio's ztunnel (DESIGN §6), so either node agent can use either
//! control plane. Each stream only ever receives what changed since what it holds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prost_types::Any;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, field, info, info_span, warn, Instrument, Span};
use ztunnel_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ztunnel_proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};

use super::grpc::{authenticate, Authenticator};

/// The subscription name meaning "every resource of this type".
const WILDCARD: &str = "*";
/// Responses queued per stream; small because snapshots coalesce in the watch channel, so a slow
/// client only ever falls behind to the newest state, never through a backlog.
const RESPONSE_BUFFER: usize = 4;

/// One resource as served: its encoded form and the version string clients echo back.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionedResource {
    /// Hash of the encoded resource: equal bytes give equal versions, so unchanged resources are
    /// never re-sent, even across controller restarts.
    pub version: String,
    /// The resource, `type_url` included.
    pub resource: Any,
}

impl VersionedResource {
    /// Wraps `resource`, computing its version from its type and bytes.
    pub fn new(resource: Any) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(resource.type_url.as_bytes());
        ctx.update(&[0]);
        ctx.update(&resource.value);
        let digest = ctx.finish();
        let version = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        VersionedResource { version, resource }
    }
}

/// Everything the controller serves at one moment, published through a
/// `watch::Receiver<Arc<ResourceSnapshot>>` so every stream can diff against its client's state.
#[derive(Debug, Clone, Default)]
pub struct ResourceSnapshot {
    version: u64,
    /// Shared, so a snapshot built on the previous one takes over each unchanged resource by
    /// pointer rather than copying its bytes.
    types: BTreeMap<String, BTreeMap<String, Arc<VersionedResource>>>,
}

impl ResourceSnapshot {
    /// An empty snapshot; `version` labels responses (`system_version_info`) and logs.
    pub fn new(version: u64) -> Self {
        ResourceSnapshot { version, types: BTreeMap::new() }
    }

    /// Builds from `type_url → name → resource`, computing each resource's version.
    pub fn from_types(version: u64, types: BTreeMap<String, BTreeMap<String, Any>>) -> Self {
        let types = types
            .into_iter()
            .map(|(type_url, named)| {
                (type_url, named.into_iter().map(|(n, r)| (n, Arc::new(VersionedResource::new(r)))).collect())
            })
            .collect();
        ResourceSnapshot { version, types }
    }

    /// Adds or replaces resource `name` under its own `type_url`.
    pub fn insert(&mut self, name: impl Into<String>, resource: Any) {
        self.insert_versioned(name, Arc::new(VersionedResource::new(resource)));
    }

    /// Adds or replaces resource `name` already versioned (taken over from an earlier snapshot).
    pub fn insert_versioned(&mut self, name: impl Into<String>, resource: Arc<VersionedResource>) {
        let type_url = &resource.resource.type_url;
        if !self.types.contains_key(type_url) {
            self.types.insert(type_url.clone(), BTreeMap::new());
        }
        self.types.get_mut(type_url).expect("inserted above").insert(name.into(), resource);
    }

    /// Sets every resource of `type_url` at once (nothing when `resources` is empty, as if none was inserted).
    pub fn set_type(&mut self, type_url: &str, resources: BTreeMap<String, Arc<VersionedResource>>) {
        if resources.is_empty() {
            self.types.remove(type_url);
        } else {
            self.types.insert(type_url.to_string(), resources);
        }
    }

    /// Removes resource `name` of `type_url`, returning whether it existed.
    pub fn remove(&mut self, type_url: &str, name: &str) -> bool {
        self.types.get_mut(type_url).is_some_and(|named| named.remove(name).is_some())
    }

    /// The snapshot's version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Sets the snapshot's version (the publisher bumps it per change).
    pub fn set_version(&mut self, version: u64) {
        self.version = version;
    }

    /// One resource, if present.
    pub fn get(&self, type_url: &str, name: &str) -> Option<&Arc<VersionedResource>> {
        self.types.get(type_url)?.get(name)
    }

    /// All resources of one type, by name.
    pub fn resources(&self, type_url: &str) -> Option<&BTreeMap<String, Arc<VersionedResource>>> {
        self.types.get(type_url)
    }
}

/// Counters an operator (and the tests) read to see whether config reaches the nodes.
#[derive(Debug, Default)]
struct AdsMetrics {
    connected: AtomicU64,
    connections_total: AtomicU64,
    pushes_total: AtomicU64,
    nacks_total: AtomicU64,
    pushes_by_type: Mutex<BTreeMap<String, u64>>,
    nacks_by_type: Mutex<BTreeMap<String, u64>>,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_string(), 1);
        }
    }
}

fn read(map: &Mutex<BTreeMap<String, u64>>, key: &str) -> u64 {
    map.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied().unwrap_or(0)
}

/// Decrements the connected-clients gauge however a stream ends.
struct ConnectedGuard(Arc<Inner>);

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.metrics.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Inner {
    snapshots: watch::Receiver<Arc<ResourceSnapshot>>,
    metrics: AdsMetrics,
    next_stream: AtomicU64,
    /// Set once by [`AdsServer::close_streams`]; every stream ends when it is.
    closing: watch::Sender<bool>,
}

/// Envoy's `AggregatedDiscoveryService`, delta variant only (what ztunnel speaks). Cheap to
/// clone: clones share the snapshot feed and the counters.
#[derive(Clone)]
pub struct AdsServer {
    inner: Arc<Inner>,
    authenticator: Option<Authenticator>,
}

impl AdsServer {
    /// Serves whatever `snapshots` holds; every new snapshot is pushed to every stream.
    pub fn new(snapshots: watch::Receiver<Arc<ResourceSnapshot>>) -> Self {
        AdsServer {
            inner: Arc::new(Inner {
                snapshots,
                metrics: AdsMetrics::default(),
                next_stream: AtomicU64::new(1),
                closing: watch::Sender::new(false),
            }),
            authenticator: None,
        }
    }

    /// Requires a valid bearer token on every stream; the node it names is logged with the stream.
    pub fn with_authenticator(self, authenticator: Authenticator) -> Self {
        AdsServer { authenticator: Some(authenticator), ..self }
    }

    /// The tonic service to mount on a server.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        // Snapshots of a large mesh exceed tonic's 4 MiB default.
        AggregatedDiscoveryServiceServer::new(self).max_encoding_message_size(usize::MAX)
    }

    /// Ends every open stream (and any opened later) with `UNAVAILABLE`, so a graceful server
    /// shutdown is not held up by streams that would otherwise last forever; node agents
    /// reconnect and keep their last config meanwhile.
    pub fn close_streams(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Streams open right now.
    pub fn connected_clients(&self) -> u64 {
        self.inner.metrics.connected.load(Ordering::Relaxed)
    }

    /// Streams accepted since start.
    pub fn connections_total(&self) -> u64 {
        self.inner.metrics.connections_total.load(Ordering::Relaxed)
    }

    /// Responses sent, all types.
    pub fn pushes_total(&self) -> u64 {
        self.inner.metrics.pushes_total.load(Ordering::Relaxed)
    }

    /// Responses sent for `type_url`.
    pub fn pushes_for(&self, type_url: &str) -> u64 {
        read(&self.inner.metrics.pushes_by_type, type_url)
    }

    /// Responses clients rejected, all types.
    pub fn nacks_total(&self) -> u64 {
        self.inner.metrics.nacks_total.load(Ordering::Relaxed)
    }

    /// Responses clients rejected for `type_url`.
    pub fn nacks_for(&self, type_url: &str) -> u64 {
        read(&self.inner.metrics.nacks_by_type, type_url)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented("only delta xDS (DeltaAggregatedResources) is served"))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let node = match &self.authenticator {
            Some(auth) => Some(authenticate(auth, request.metadata()).inspect_err(|s| {
                warn!(peer = ?request.remote_addr(), reason = s.message(), "ADS stream refused");
            })?),
            None => None,
        };
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("ads_stream", id, node = node.as_deref().unwrap_or("-"), client = field::Empty);
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let metrics = &self.inner.metrics;
        metrics.connected.fetch_add(1, Ordering::Relaxed);
        metrics.connections_total.fetch_add(1, Ordering::Relaxed);
        let guard = ConnectedGuard(self.inner.clone());
        let stream = AdsStream {
            inner: self.inner.clone(),
            snapshots: self.inner.snapshots.clone(),
            tx,
            types: BTreeMap::new(),
            nonces: 0,
            span: span.clone(),
        };
        tokio::spawn(
            async move {
                let _guard = guard;
                info!(peer = ?request.remote_addr(), "ADS stream open");
                let reason = stream.run(request.into_inner()).await;
                info!(reason, "ADS stream closed");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What one stream's client holds and wants of one type.
#[derive(Debug, Default)]
struct TypeState {
    /// Subscribed to every resource of the type.
    wildcard: bool,
    /// Explicitly subscribed names (on-demand lookups), in addition to or instead of wildcard.
    names: BTreeSet<String>,
    /// What the client holds: name → version (from `initial_resource_versions` and our sends).
    /// Rejected (NACKed) versions stay here, so they are not re-sent until they change.
    known: HashMap<String, String>,
    /// Nonce of the latest response, to tell current ACK/NACKs from stale ones.
    last_nonce: Option<String>,
    /// The snapshot the last wildcard delta brought the client to, while `known` is exactly its resources of
    /// this type: the next delta is then a walk over what changed between two snapshots (a few entries after an
    /// edit) instead of over everything the client holds (12,000 at scale). Cleared by any subscription change.
    in_sync_with: Option<Arc<ResourceSnapshot>>,
}

impl TypeState {
    /// Computes the response that brings the client from `known` to `current`: changed or new
    /// subscribed resources, and removals for held names that no longer exist. Names in `fresh`
    /// (just subscribed by name) are always answered, with the resource or a removal meaning
    /// "no such resource", which is what ends an on-demand lookup in Istio's ztunnel.
    fn delta(
        &mut self,
        type_url: &str,
        snapshot: &Arc<ResourceSnapshot>,
        fresh: &BTreeSet<String>,
    ) -> (Vec<Resource>, Vec<String>) {
        let empty = BTreeMap::new();
        let current = snapshot.resources(type_url).unwrap_or(&empty);
        let before = self.in_sync_with.take().filter(|_| self.wildcard && fresh.is_empty());
        let out = match before {
            Some(before) => self.changes(before.resources(type_url).unwrap_or(&empty), current),
            None => self.full_delta(current, fresh),
        };
        if self.wildcard {
            self.in_sync_with = Some(snapshot.clone());
        }
        out
    }

    /// The delta from the client's `known`, which equals `before`, to `current`: both maps are walked side by
    /// side and resources shared by pointer are skipped unread.
    fn changes(
        &mut self,
        before: &BTreeMap<String, Arc<VersionedResource>>,
        current: &BTreeMap<String, Arc<VersionedResource>>,
    ) -> (Vec<Resource>, Vec<String>) {
        use std::cmp::Ordering::{Equal, Greater, Less};
        let (mut resources, mut removed) = (Vec::new(), Vec::new());
        let (mut old, mut new) = (before.iter().peekable(), current.iter().peekable());
        loop {
            let order = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => Less,
                (None, Some(_)) => Greater,
                (Some((a, _)), Some((b, _))) => a.cmp(b),
            };
            match order {
                Less => {
                    let (name, _) = old.next().expect("peeked");
                    if self.known.remove(name).is_some() {
                        removed.push(name.clone());
                    }
                }
                Greater => {
                    let (name, vr) = new.next().expect("peeked");
                    self.offer(name, vr, false, &mut resources);
                }
                Equal => {
                    let ((_, was), (name, vr)) = (old.next().expect("peeked"), new.next().expect("peeked"));
                    if !Arc::ptr_eq(was, vr) {
                        self.offer(name, vr, false, &mut resources);
                    }
                }
            }
        }
        (resources, removed)
    }

    /// Adds `vr` to `resources` when the client does not hold that version (or `always`), and records it held.
    fn offer(&mut self, name: &str, vr: &VersionedResource, always: bool, resources: &mut Vec<Resource>) {
        if always || self.known.get(name) != Some(&vr.version) {
            self.known.insert(name.to_string(), vr.version.clone());
            resources.push(Resource {
                name: name.to_string(),
                version: vr.version.clone(),
                resource: Some(vr.resource.clone()),
                ..Default::default()
            });
        }
    }

    /// The delta from whatever `known` holds to `current`, answering the names in `fresh` in any case.
    fn full_delta(
        &mut self,
        current: &BTreeMap<String, Arc<VersionedResource>>,
        fresh: &BTreeSet<String>,
    ) -> (Vec<Resource>, Vec<String>) {
        let mut removed = Vec::new();
        self.known.retain(|name, _| {
            let keep = current.contains_key(name);
            if !keep {
                removed.push(name.clone());
            }
            keep
        });
        let mut resources = Vec::new();
        if self.wildcard {
            for (name, vr) in current {
                self.offer(name, vr, fresh.contains(name), &mut resources);
            }
        } else {
            let named: Vec<(&String, &Arc<VersionedResource>)> =
                self.names.iter().filter_map(|n| current.get_key_value(n.as_str())).collect();
            for (name, vr) in named {
                self.offer(name, vr, fresh.contains(name), &mut resources);
            }
        }
        for name in fresh {
            if !current.contains_key(name) && !removed.contains(name) {
                removed.push(name.clone());
            }
        }
        removed.sort();
        (resources, removed)
    }
}

/// Why a stream ended (logged).
type EndReason = &'static str;

/// One client's stream: its per-type state, driven by its requests and by new snapshots.
struct AdsStream {
    inner: Arc<Inner>,
    snapshots: watch::Receiver<Arc<ResourceSnapshot>>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    types: BTreeMap<String, TypeState>,
    nonces: u64,
    span: Span,
}

impl AdsStream {
    async fn run(mut self, mut requests: Streaming<DeltaDiscoveryRequest>) -> EndReason {
        let mut closing = self.inner.closing.subscribe();
        // Requests are handled against the current snapshot without marking it seen, so a
        // snapshot that arrived meanwhile is still pushed to every subscribed type (a repeat
        // costs nothing: deltas against what the client holds are then empty).
        loop {
            tokio::select! {
                request = requests.next() => match request {
                    None => return "client closed the stream",
                    Some(Err(status)) => {
                        debug!(code = ?status.code(), message = status.message(), "ADS receive failed");
                        return "receive failed";
                    }
                    Some(Ok(request)) => {
                        let snapshot = self.snapshots.borrow().clone();
                        if !self.handle_request(request, &snapshot).await {
                            return "client gone";
                        }
                    }
                },
                _ = async { closing.wait_for(|closing| *closing).await.map(|_| ()) } => {
                    let _ = self.tx.try_send(Err(Status::unavailable("control plane shutting down")));
                    return "controller shutting down";
                }
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        return "snapshot publisher gone";
                    }
                    let snapshot = self.snapshots.borrow_and_update().clone();
                    if !self.push_all(&snapshot).await {
                        return "client gone";
                    }
                }
            }
        }
    }

    /// Applies one request: ACK/NACK bookkeeping, then subscription changes (answered at once).
    /// Returns false when the client is gone.
    async fn handle_request(&mut self, req: DeltaDiscoveryRequest, snapshot: &Arc<ResourceSnapshot>) -> bool {
        if let Some(node) = req.node.as_ref().filter(|n| self.types.is_empty() && !n.id.is_empty()) {
            self.span.record("client", node.id.as_str());
        }
        let type_url = req.type_url.clone();
        if !req.response_nonce.is_empty() {
            self.acknowledge(&req);
        }
        let first = !self.types.contains_key(&type_url);
        let state = self.types.entry(type_url.clone()).or_default();
        if first {
            // Envoy's legacy rule: a first request naming nothing is a wildcard subscription.
            state.wildcard = req.resource_names_subscribe.is_empty();
            // The client already holds these; like istiod, treat them as subscribed so their
            // removal is reported, and send only what differs.
            for (name, version) in &req.initial_resource_versions {
                state.names.insert(name.clone());
                state.known.insert(name.clone(), version.clone());
            }
        }
        let mut fresh = BTreeSet::new();
        for name in &req.resource_names_subscribe {
            if name == WILDCARD {
                state.wildcard = true;
            } else if state.names.insert(name.clone()) || !first {
                fresh.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == WILDCARD {
                state.wildcard = false;
                let names = &state.names;
                state.known.retain(|n, _| names.contains(n));
            } else {
                state.names.remove(name);
                fresh.remove(name);
                if !state.wildcard {
                    state.known.remove(name);
                }
            }
        }
        let subscription_change =
            !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty();
        if first || subscription_change {
            state.in_sync_with = None;
        }
        if first {
            debug!(
                type_url,
                wildcard = state.wildcard,
                names = state.names.len(),
                held = state.known.len(),
                "subscribed"
            );
        }
        if !first && !subscription_change {
            return true; // a plain ACK/NACK
        }
        let (resources, removed) = state.delta(&type_url, snapshot, &fresh);
        // The first request of a type is always answered, even with nothing: Istio's ztunnel
        // becomes ready only after one response per type.
        if resources.is_empty() && removed.is_empty() && !first {
            return true;
        }
        self.send(&type_url, snapshot.version(), resources, removed).await
    }

    /// Logs and counts an ACK or NACK. A NACK changes nothing else: the rejected versions stay
    /// recorded as held, so they are not re-sent in a loop; the next change is.
    fn acknowledge(&mut self, req: &DeltaDiscoveryRequest) {
        let current = self.types.get(&req.type_url).and_then(|s| s.last_nonce.as_deref()) == Some(&req.response_nonce);
        match &req.error_detail {
            None => debug!(type_url = req.type_url, nonce = req.response_nonce, current, "ACK"),
            Some(err) => {
                let metrics = &self.inner.metrics;
                metrics.nacks_total.fetch_add(1, Ordering::Relaxed);
                bump(&metrics.nacks_by_type, &req.type_url);
                warn!(
                    type_url = req.type_url,
                    nonce = req.response_nonce,
                    current,
                    code = err.code,
                    message = err.message,
                    "client rejected config (NACK)"
                );
            }
        }
    }

    /// Pushes every subscribed type's delta after a snapshot change.
    async fn push_all(&mut self, snapshot: &Arc<ResourceSnapshot>) -> bool {
        let mut pending = Vec::new();
        for (type_url, state) in &mut self.types {
            let (resources, removed) = state.delta(type_url, snapshot, &BTreeSet::new());
            if !resources.is_empty() || !removed.is_empty() {
                pending.push((type_url.clone(), resources, removed));
            }
        }
        for (type_url, resources, removed) in pending {
            if !self.send(&type_url, snapshot.version(), resources, removed).await {
                return false;
            }
        }
        true
    }

    async fn send(&mut self, type_url: &str, version: u64, resources: Vec<Resource>, removed: Vec<String>) -> bool {
        self.nonces += 1;
        let nonce = format!("{version}-{}", self.nonces);
        debug!(type_url, nonce, resources = resources.len(), removed = removed.len(), version, "push");
        if let Some(state) = self.types.get_mut(type_url) {
            state.last_nonce = Some(nonce.clone());
        }
        let response = DeltaDiscoveryResponse {
            system_version_info: version.to_string(),
            type_url: type_url.to_string(),
            resources,
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        if self.tx.send(Ok(response)).await.is_err() {
            return false;
        }
        let metrics = &self.inner.metrics;
        metrics.pushes_total.fetch_add(1, Ordering::Relaxed);
        bump(&metrics.pushes_by_type, type_url);
        true
    }
}

#[cfg(test)]
#[path = "ads_tests.rs"]
mod tests;
