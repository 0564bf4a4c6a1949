//! The node agent's delta ADS client: subscribes to Istio's `Address` and `Authorization`
//! types on `XDS_ADDRESS`, applies adds and removes into the state store, ACKs or NACKs each
//! response (naming every resource it rejected), and reconnects with backoff while the
//! proxies keep serving the last good state.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn, Instrument};
use ztunnel_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ztunnel_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ztunnel_proto::envoy::config::core::v3::Node;
use ztunnel_proto::google::rpc::Status;
use ztunnel_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

use super::convert::{self, AddressResource};
use crate::grpc::{with_bearer, ControlPlaneEndpoint, GrpcError};
use crate::policy::{Authorization, InvalidPolicy, PolicyScope};
use crate::state::{LocalConfig, StateStore};

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// The server (`XDS_ADDRESS`, `XDS_ROOT_CA`, `AUTH_TOKEN`).
    pub server: ControlPlaneEndpoint,
    /// This node's name (Node metadata `NODE_NAME`, and the node id).
    pub node_name: String,
    /// `CLUSTER_ID`.
    pub cluster_id: String,
}

/// Counters the metrics endpoint and tests read.
#[derive(Debug, Default)]
pub struct XdsStats {
    /// Responses applied, per type (`istio_xds_message_total`).
    pub messages: [AtomicU64; 2],
    /// Responses NACKed, per type.
    pub nacks: [AtomicU64; 2],
    /// Individual resources rejected, per type.
    pub rejected_resources: [AtomicU64; 2],
    /// Streams that ended (and were reconnected).
    pub disconnects: AtomicU64,
    /// Whether the first response of every type has been applied.
    pub synced: std::sync::atomic::AtomicBool,
}

/// The two type URLs, in the index order of [`XdsStats`]' arrays.
pub const TYPE_URLS: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];

/// Why a stream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error(transparent)]
    Connect(#[from] GrpcError),
    #[error("xDS stream: {0}")]
    Stream(#[from] tonic::Status),
}

/// Everything received so far, by resource name, with the version the server gave it.
#[derive(Debug, Default)]
pub(crate) struct Resources {
    addresses: BTreeMap<String, (String, AddressResource)>,
    /// A policy that could not be read is kept as a marker that fails closed.
    policies: BTreeMap<String, (String, Result<Authorization, InvalidPolicy>)>,
}

impl Resources {
    pub(crate) fn config(&self) -> LocalConfig {
        let mut c = LocalConfig::default();
        c.workloads.reserve(self.addresses.len());
        for (_, a) in self.addresses.values() {
            match a {
                AddressResource::Workload(w) => c.workloads.push(w.clone()),
                AddressResource::Service(s) => c.services.push(s.clone()),
            }
        }
        for (_, p) in self.policies.values() {
            match p {
                Ok(p) => c.policies.push(p.clone()),
                Err(i) => c.invalid_policies.push(i.clone()),
            }
        }
        c
    }

    pub(crate) fn versions(&self, type_idx: usize) -> HashMap<String, String> {
        match type_idx {
            0 => self.addresses.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect(),
            _ => self.policies.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect(),
        }
    }

    /// Applies one response; returns the rejected resources as `name: reason`.
    pub(crate) fn apply(&mut self, type_idx: usize, resp: &DeltaDiscoveryResponse) -> Vec<String> {
        let mut errors = Vec::new();
        for name in &resp.removed_resources {
            match type_idx {
                0 => drop(self.addresses.remove(name)),
                _ => drop(self.policies.remove(name)),
            }
        }
        for r in &resp.resources {
            let Some(any) = &r.resource else {
                errors.push(format!("{}: resource has no body", r.name));
                continue;
            };
            if any.type_url != TYPE_URLS[type_idx] {
                errors.push(format!("{}: type {} inside a {} response", r.name, any.type_url, TYPE_URLS[type_idx]));
                continue;
            }
            if type_idx == 0 {
                match convert::address(&any.value) {
                    Ok(a) => drop(self.addresses.insert(r.name.clone(), (r.version.clone(), a))),
                    // The previous version (if any) stays in force.
                    Err(e) => errors.push(format!("{}: {e}", r.name)),
                }
                continue;
            }
            match convert::authorization(&any.value) {
                Ok(p) => drop(self.policies.insert(r.name.clone(), (r.version.clone(), Ok(p)))),
                Err(e) => {
                    // A policy we cannot read must not be silently absent: a lost DENY, or an
                    // ALLOW-only workload turned allow-all. With no good version to keep, the
                    // workloads it may select deny until it is fixed.
                    if !self.policies.contains_key(&r.name) {
                        let (namespace, name) = match r.name.split_once('/') {
                            Some((ns, n)) => (Some(ns.to_string()), Some(n.to_string())),
                            None => (None, Some(r.name.clone())),
                        };
                        let marker = InvalidPolicy { namespace, name, scope: None::<PolicyScope>, reason: e.clone() };
                        self.policies.insert(r.name.clone(), (String::new(), Err(marker)));
                    }
                    errors.push(format!("{}: {e}", r.name));
                }
            }
        }
        errors
    }
}

/// Runs the client until the task is aborted: connect, stream, and on any failure wait
/// (exponential backoff, 100 ms to 15 s) and reconnect, keeping the state applied so far.
pub async fn run(cfg: XdsConfig, store: Arc<StateStore>, stats: Arc<XdsStats>) {
    let mut resources = Resources::default();
    let mut backoff = Duration::from_millis(100);
    loop {
        let span = tracing::info_span!("xds", server = %cfg.server.address);
        match stream(&cfg, &store, &stats, &mut resources, &mut backoff).instrument(span).await {
            Ok(()) => info!(server = %cfg.server.address, "xDS stream closed by the server; reconnecting"),
            Err(e) => {
                warn!(server = %cfg.server.address, error = %e, retry_in = ?backoff, "xDS stream failed; serving the last good state")
            }
        }
        stats.disconnects.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(15));
    }
}

fn node(cfg: &XdsConfig) -> Node {
    use prost_types::{value::Kind, Struct, Value};
    let s = |v: &str| Value { kind: Some(Kind::StringValue(v.to_string())) };
    let fields =
        [("NODE_NAME", s(&cfg.node_name)), ("CLUSTER_ID", s(&cfg.cluster_id))].into_iter().map(|(k, v)| (k.into(), v));
    Node {
        id: format!("ztunnel~0.0.0.0~{}.ztunnel~ztunnel.svc.cluster.local", cfg.node_name),
        cluster: cfg.cluster_id.clone(),
        metadata: Some(Struct { fields: fields.collect() }),
        ..Default::default()
    }
}

async fn stream(
    cfg: &XdsConfig,
    store: &StateStore,
    stats: &XdsStats,
    resources: &mut Resources,
    backoff: &mut Duration,
) -> Result<(), XdsError> {
    let bearer = cfg.server.bearer()?;
    let channel = cfg.server.connect().await?;
    let mut client = AggregatedDiscoveryServiceClient::with_interceptor(channel, with_bearer(bearer));
    let (tx, rx) = mpsc::channel(16);
    // Subscribe to both types (wildcard), telling the server what we already hold so a
    // reconnect sends only what changed.
    for (i, type_url) in TYPE_URLS.iter().enumerate() {
        let req = DeltaDiscoveryRequest {
            node: (i == 0).then(|| node(cfg)),
            type_url: type_url.to_string(),
            initial_resource_versions: resources.versions(i),
            ..Default::default()
        };
        tx.send(req).await.expect("receiver is alive");
    }
    let mut inbound = client.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    info!("xDS stream established");
    let mut seen = [false; 2];
    while let Some(resp) = inbound.message().await? {
        let Some(idx) = TYPE_URLS.iter().position(|t| *t == resp.type_url) else {
            warn!(type_url = %resp.type_url, "response for a type not subscribed; NACK");
            let nack = nack(&resp, format!("type {} is not supported", resp.type_url));
            let _ = tx.send(nack).await;
            continue;
        };
        *backoff = Duration::from_millis(100);
        let applying = std::time::Instant::now();
        let errors = resources.apply(idx, &resp);
        let decoded_us = applying.elapsed().as_micros() as u64;
        // Freed after the ACK is out: dropping 12,000 indexed entries is not part of applying a change.
        let replaced = store.replace(resources.config());
        let apply_us = applying.elapsed().as_micros() as u64;
        stats.messages[idx].fetch_add(1, Ordering::Relaxed);
        seen[idx] = true;
        if seen.iter().all(|s| *s) {
            stats.synced.store(true, Ordering::Release);
            store.mark_synced();
        }
        debug!(type_url = %resp.type_url, added = resp.resources.len(), removed = resp.removed_resources.len(), decoded_us, apply_us, "xDS applied");
        let reply = if errors.is_empty() {
            DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            }
        } else {
            stats.nacks[idx].fetch_add(1, Ordering::Relaxed);
            stats.rejected_resources[idx].fetch_add(errors.len() as u64, Ordering::Relaxed);
            let message = format!("rejected {}: {}", errors.len(), errors.join("; "));
            warn!(type_url = %resp.type_url, %message, "xDS NACK; the previous versions stay in force");
            nack(&resp, message)
        };
        let sent = tx.send(reply).await;
        drop(replaced);
        if sent.is_err() {
            break;
        }
    }
    Ok(())
}

fn nack(resp: &DeltaDiscoveryResponse, message: String) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        // google.rpc.Code INVALID_ARGUMENT.
        error_detail: Some(Status { code: 3, message, details: vec![] }),
        ..Default::default()
    }
}

impl XdsStats {
    /// For `/config_dump`: whether synced, and the counters by type.
    pub fn summary(&self) -> serde_json::Value {
        let by_type = |a: &[AtomicU64; 2]| {
            TYPE_URLS.iter().zip(a).map(|(t, v)| (t.to_string(), v.load(Ordering::Relaxed))).collect::<BTreeMap<_, _>>()
        };
        serde_json::json!({
            "synced": self.synced.load(Ordering::Acquire),
            "messages": by_type(&self.messages),
            "nacks": by_type(&self.nacks),
            "rejectedResources": by_type(&self.rejected_resources),
            "disconnects": self.disconnects.load(Ordering::Relaxed),
        })
    }
}

/// Exposes the client's counters on the agent's metrics endpoint.
pub fn register_metrics(metrics: &crate::metrics::Metrics, stats: Arc<XdsStats>) {
    let by_type = |pick: fn(&XdsStats) -> &[AtomicU64; 2], stats: Arc<XdsStats>| {
        Box::new(move || {
            TYPE_URLS
                .iter()
                .zip(pick(&stats))
                .map(|(t, v)| (vec![("type_url".to_string(), t.to_string())], v.load(Ordering::Relaxed)))
                .collect()
        }) as crate::metrics::CollectFn
    };
    metrics.add_collector(
        "ztunnel_xds_messages",
        "xDS responses applied, by type",
        by_type(|s| &s.messages, stats.clone()),
    );
    metrics.add_collector(
        "ztunnel_xds_nacks",
        "xDS responses NACKed because a resource was invalid, by type",
        by_type(|s| &s.nacks, stats.clone()),
    );
    metrics.add_collector(
        "ztunnel_xds_rejected_resources",
        "xDS resources rejected (the previous version stays in force), by type",
        by_type(|s| &s.rejected_resources, stats.clone()),
    );
    metrics.add_collector(
        "ztunnel_xds_disconnects",
        "xDS streams that ended and were reconnected",
        Box::new(move || vec![(vec![], stats.disconnects.load(Ordering::Relaxed))]),
    );
}
