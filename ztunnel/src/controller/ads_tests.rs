//! Delta ADS behaviour over real tonic + TLS on loopback, one behaviour per test.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use prost_types::Any;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status, Streaming};
use ztunnel_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ztunnel_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ztunnel_proto::envoy::config::core::v3::Node;
use ztunnel_proto::google::rpc::Status as RpcStatus;
use ztunnel_proto::security::Authorization;
use ztunnel_proto::workload::{address, Address, Workload};
use ztunnel_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

use super::*;
use crate::controller::ca::CaServer;
use crate::controller::grpc::testing::{authenticator, test_ca, with_token, TestServer};

const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is observed for.
const QUIET: Duration = Duration::from_millis(300);

fn workload(name: &str, ip: [u8; 4]) -> Any {
    let addr = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: format!("Kubernetes//Pod/default/{name}"),
            name: name.to_string(),
            namespace: "default".to_string(),
            addresses: vec![ip.to_vec()],
            ..Default::default()
        })),
    };
    Any { type_url: ADDRESS_TYPE_URL.to_string(), value: addr.encode_to_vec() }
}

fn policy(name: &str) -> Any {
    let p = Authorization { name: name.to_string(), namespace: "default".to_string(), ..Default::default() };
    Any { type_url: AUTHORIZATION_TYPE_URL.to_string(), value: p.encode_to_vec() }
}

fn snapshot(version: u64, workloads: &[(&str, [u8; 4])], policies: &[&str]) -> Arc<ResourceSnapshot> {
    let mut s = ResourceSnapshot::new(version);
    for (name, ip) in workloads {
        s.insert(format!("default/{name}"), workload(name, *ip));
    }
    for name in policies {
        s.insert(format!("default/{name}"), policy(name));
    }
    Arc::new(s)
}

struct Harness {
    publish: watch::Sender<Arc<ResourceSnapshot>>,
    ads: AdsServer,
    server: TestServer,
}

impl Harness {
    async fn start(initial: Arc<ResourceSnapshot>) -> Harness {
        let (publish, snapshots) = watch::channel(initial);
        let ads = AdsServer::new(snapshots).with_authenticator(authenticator());
        let issuer = test_ca();
        let ca = CaServer::new(issuer.clone(), authenticator(), Arc::new(|_: &str, _: &_| Ok(())));
        let server = TestServer::start(&issuer, ads.clone(), ca).await;
        Harness { publish, ads, server }
    }

    async fn connect(&self, token: Option<&str>) -> Result<Client, Status> {
        let mut grpc = AggregatedDiscoveryServiceClient::new(self.server.channel().await);
        let (tx, rx) = mpsc::channel(16);
        let responses =
            grpc.delta_aggregated_resources(with_token(Request::new(ReceiverStream::new(rx)), token)).await?;
        Ok(Client { tx, responses: responses.into_inner() })
    }
}

/// A hand-driven delta xDS client: sends exactly the requests a test spells out.
struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
}

impl Client {
    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.expect("request stream open");
    }

    /// The first request of a type, as Istio's ztunnel sends it (wildcard: no names).
    async fn subscribe(&self, type_url: &str, initial: HashMap<String, String>) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            node: Some(Node {
                id: "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local".into(),
                ..Default::default()
            }),
            initial_resource_versions: initial,
            ..Default::default()
        })
        .await;
    }

    async fn ack(&self, resp: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, self.responses.message())
            .await
            .expect("timed out waiting for a response")
            .expect("stream failed")
            .expect("stream ended")
    }

    /// Receives one response per type in `types` (any order), keyed by type URL.
    async fn recv_types(&mut self, n: usize) -> BTreeMap<String, DeltaDiscoveryResponse> {
        let mut out = BTreeMap::new();
        for _ in 0..n {
            let resp = self.recv().await;
            assert!(out.insert(resp.type_url.clone(), resp).is_none(), "two responses for one type");
        }
        out
    }

    async fn assert_quiet(&mut self) {
        if let Ok(msg) = tokio::time::timeout(QUIET, self.responses.message()).await {
            panic!("expected no response, got {msg:?}");
        }
    }
}

fn names(resp: &DeltaDiscoveryResponse) -> Vec<&str> {
    let mut names: Vec<&str> = resp.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    names
}

fn versions(resp: &DeltaDiscoveryResponse) -> HashMap<String, String> {
    resp.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect()
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn wildcard_client_gets_everything_then_only_changes_and_removals() {
    let h = Harness::start(snapshot(1, &[("a", [10, 0, 0, 1]), ("b", [10, 0, 0, 2])], &["deny-all"])).await;
    let mut c = h.connect(Some("token-node-a")).await.unwrap();
    c.subscribe(ADDRESS_TYPE_URL, HashMap::new()).await;
    c.subscribe(AUTHORIZATION_TYPE_URL, HashMap::new()).await;
    let first = c.recv_types(2).await;
    assert_eq!(names(&first[ADDRESS_TYPE_URL]), ["default/a", "default/b"]);
    assert_eq!(names(&first[AUTHORIZATION_TYPE_URL]), ["default/deny-all"]);
    assert!(first.values().all(|r| r.removed_resources.is_empty()));
    for resp in first.values() {
        c.ack(resp).await;
    }
    eventually("the stream to be counted", || h.ads.connected_clients() == 1).await;

    // b moves to a new IP, deny-all is deleted; a is untouched.
    h.publish.send_replace(snapshot(2, &[("a", [10, 0, 0, 1]), ("b", [10, 0, 0, 9])], &[]));
    let update = c.recv_types(2).await;
    let addresses = &update[ADDRESS_TYPE_URL];
    assert_eq!(names(addresses), ["default/b"]);
    assert!(addresses.removed_resources.is_empty());
    assert_eq!(addresses.system_version_info, "2");
    let policies = &update[AUTHORIZATION_TYPE_URL];
    assert!(policies.resources.is_empty());
    assert_eq!(policies.removed_resources, ["default/deny-all"]);
    c.assert_quiet().await;
    assert_eq!(h.ads.pushes_for(ADDRESS_TYPE_URL), 2);
    assert_eq!(h.ads.pushes_total(), 4);
}

#[tokio::test]
async fn reconnect_with_initial_resource_versions_sends_only_differences() {
    let h = Harness::start(snapshot(1, &[("a", [10, 0, 0, 1]), ("b", [10, 0, 0, 2]), ("c", [10, 0, 0, 3])], &[])).await;
    let mut c = h.connect(Some("token-node-a")).await.unwrap();
    c.subscribe(ADDRESS_TYPE_URL, HashMap::new()).await;
    let held = versions(&c.recv().await);
    assert_eq!(held.len(), 3);
    drop(c);
    eventually("the first stream to close", || h.ads.connected_clients() == 0).await;

    // While the client is away: b changes, c is deleted.
    h.publish.send_replace(snapshot(2, &[("a", [10, 0, 0, 1]), ("b", [10, 0, 0, 9])], &[]));
    let mut c = h.connect(Some("token-node-a")).await.unwrap();
    c.subscribe(ADDRESS_TYPE_URL, held).await;
    let resp = c.recv().await;
    assert_eq!(names(&resp), ["default/b"], "a is unchanged and must not be re-sent");
    assert_eq!(resp.removed_resources, ["default/c"]);
    c.assert_quiet().await;
}

/// Collects formatted log lines; the test runtime is single-threaded, so a thread-local
/// subscriber sees the server's stream tasks.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn contents(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn nack_is_counted_and_logged_without_a_resend_loop_and_later_changes_still_arrive() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let h = Harness::start(snapshot(1, &[("a", [10, 0, 0, 1])], &[])).await;
    let mut c = h.connect(Some("token-node-a")).await.unwrap();
    c.subscribe(ADDRESS_TYPE_URL, HashMap::new()).await;
    let resp = c.recv().await;
    c.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.to_string(),
        response_nonce: resp.nonce.clone(),
        error_detail: Some(RpcStatus { code: 3, message: "default/a: unknown network".into(), details: vec![] }),
        ..Default::default()
    })
    .await;
    eventually("the NACK to be counted", || h.ads.nacks_total() == 1).await;
    assert_eq!(h.ads.nacks_for(ADDRESS_TYPE_URL), 1);
    assert_eq!(h.ads.nacks_for(AUTHORIZATION_TYPE_URL), 0);
    c.assert_quiet().await;
    let logged = logs.contents();
    assert!(logged.contains("WARN") && logged.contains("NACK"), "NACK not logged at warn: {logged}");
    assert!(logged.contains("default/a: unknown network"), "NACK message not logged: {logged}");

    h.publish.send_replace(snapshot(2, &[("a", [10, 0, 0, 2])], &[]));
    let update = c.recv().await;
    assert_eq!(names(&update), ["default/a"]);
    assert_ne!(update.nonce, resp.nonce);
    assert_eq!(h.ads.pushes_total(), 2);
}

#[tokio::test]
async fn stream_without_a_valid_token_is_refused() {
    let h = Harness::start(snapshot(1, &[("a", [10, 0, 0, 1])], &[])).await;
    for token in [None, Some("not-a-known-token")] {
        let err = h.connect(token).await.err().expect("stream must be refused");
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
    }
    assert_eq!(h.ads.connections_total(), 0);
}

#[tokio::test]
async fn on_demand_subscription_gets_named_resources_and_removals_for_unknown_names() {
    let h = Harness::start(snapshot(1, &[("a", [10, 0, 0, 1]), ("b", [10, 0, 0, 2])], &[])).await;
    let mut c = h.connect(Some("token-node-a")).await.unwrap();
    // Istio's on-demand start: subscribe and unsubscribe "*" at once, i.e. subscribe to nothing.
    c.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.to_string(),
        resource_names_subscribe: vec!["*".into()],
        resource_names_unsubscribe: vec!["*".into()],
        ..Default::default()
    })
    .await;
    let empty = c.recv().await;
    assert!(empty.resources.is_empty() && empty.removed_resources.is_empty());

    c.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.to_string(),
        resource_names_subscribe: vec!["default/b".into(), "default/nope".into()],
        ..Default::default()
    })
    .await;
    let resp = c.recv().await;
    assert_eq!(names(&resp), ["default/b"]);
    assert_eq!(resp.removed_resources, ["default/nope"], "unknown names are answered as absent");

    // Changes to unsubscribed resources are not pushed; subscribed ones are.
    h.publish.send_replace(snapshot(2, &[("a", [10, 0, 0, 7]), ("b", [10, 0, 0, 8])], &[]));
    assert_eq!(names(&c.recv().await), ["default/b"]);
    c.assert_quiet().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_so_the_server_can_stop() {
    let h = Harness::start(snapshot(1, &[("a", [10, 0, 0, 1])], &[])).await;
    let mut c = h.connect(Some("token-node-a")).await.unwrap();
    c.subscribe(ADDRESS_TYPE_URL, HashMap::new()).await;
    c.recv().await;
    tokio::time::timeout(WAIT, h.server.stop()).await.expect("server stops despite an open stream");
    let end = tokio::time::timeout(WAIT, c.responses.message()).await.expect("stream ends");
    assert!(matches!(&end, Err(s) if s.code() == Code::Unavailable) || matches!(end, Ok(None)), "{end:?}");
}

#[test]
fn resource_version_depends_only_on_content() {
    let a1 = VersionedResource::new(workload("a", [10, 0, 0, 1]));
    let a2 = VersionedResource::new(workload("a", [10, 0, 0, 1]));
    let a3 = VersionedResource::new(workload("a", [10, 0, 0, 2]));
    assert_eq!(a1.version, a2.version);
    assert_ne!(a1.version, a3.version);
}

/// A resource table in which `taken` are `from`'s own (shared) entries and `fresh` are new.
fn successor(from: &ResourceSnapshot, taken: &[&str], fresh: &[(&str, [u8; 4])]) -> Arc<ResourceSnapshot> {
    let mut s = ResourceSnapshot::new(from.version() + 1);
    for name in taken {
        s.insert_versioned(*name, from.get(ADDRESS_TYPE_URL, name).expect("present").clone());
    }
    for (name, ip) in fresh {
        s.insert(*name, workload(name, *ip));
    }
    Arc::new(s)
}

#[test]
fn a_delta_walked_between_snapshots_equals_the_delta_from_what_the_client_holds() {
    let first =
        successor(&ResourceSnapshot::new(0), &[], &[("a", [10, 0, 0, 1]), ("b", [10, 0, 0, 2]), ("c", [10, 0, 0, 3])]);
    // "b" rebuilt with the same bytes (not the same Arc), "c" changed, "d" new, "a" removed, "e" taken over.
    let mut second =
        (*successor(&first, &[], &[("b", [10, 0, 0, 2]), ("c", [10, 0, 0, 9]), ("d", [10, 0, 0, 4])])).clone();
    second.insert_versioned("e", first.get(ADDRESS_TYPE_URL, "b").unwrap().clone());
    let second = Arc::new(second);
    let mut walked = TypeState { wildcard: true, ..Default::default() };
    assert_eq!(walked.delta(ADDRESS_TYPE_URL, &first, &BTreeSet::new()).0.len(), 3);
    let mut full = TypeState { wildcard: true, known: walked.known.clone(), ..Default::default() };
    assert!(walked.in_sync_with.is_some(), "the next delta walks the two snapshots");
    let (w_res, w_removed) = walked.delta(ADDRESS_TYPE_URL, &second, &BTreeSet::new());
    let (f_res, f_removed) = full.delta(ADDRESS_TYPE_URL, &second, &BTreeSet::new());
    let names = |r: &[Resource]| r.iter().map(|r| (r.name.clone(), r.version.clone())).collect::<Vec<_>>();
    assert_eq!(names(&w_res), names(&f_res));
    assert_eq!(w_removed, f_removed);
    assert_eq!(w_removed, ["a"]);
    assert_eq!(names(&w_res).iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["c", "d", "e"]);
    assert_eq!(walked.known, full.known);
}
