//! The conversion of Istio's resources and how a response is applied: what is accepted,
//! what is rejected (by name, with the previous version kept), and that an unreadable
//! policy fails closed.
use prost::Message;
use ztunnel_proto::discovery::{DeltaDiscoveryResponse, Resource};
use ztunnel_proto::security as pb_sec;
use ztunnel_proto::workload as pb;
use ztunnel_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

use super::client::Resources;
use super::convert::{address, authorization, AddressResource};
use crate::policy::{PolicyAction, PolicyScope, StringMatch};
use crate::state::WorkloadProtocol;

fn pb_workload(uid: &str, ip: [u8; 4]) -> pb::Workload {
    pb::Workload {
        uid: uid.into(),
        name: "reviews-v1-abc".into(),
        namespace: "bookinfo".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        service_account: "bookinfo-reviews".into(),
        node: "node-a".into(),
        canonical_name: "reviews".into(),
        canonical_revision: "v1".into(),
        workload_type: pb::WorkloadType::Deployment as i32,
        workload_name: "reviews-v1".into(),
        cluster_id: "Kubernetes".into(),
        services: [(
            "bookinfo/reviews.bookinfo.svc.cluster.local".to_string(),
            pb::PortList { ports: vec![pb::Port { service_port: 9080, target_port: 9080, app_protocol: 0 }] },
        )]
        .into_iter()
        .collect(),
        authorization_policies: vec!["bookinfo/allow-productpage".into()],
        ..Default::default()
    }
}

fn wrap(w: pb::Workload) -> Vec<u8> {
    pb::Address { r#type: Some(pb::address::Type::Workload(w)) }.encode_to_vec()
}

fn deny_policy(name: &str, port: u32) -> pb_sec::Authorization {
    let m = pb_sec::Match {
        principals: vec![pb_sec::StringMatch {
            match_type: Some(pb_sec::string_match::MatchType::Prefix("cluster.local/ns/evil".into())),
        }],
        destination_ports: vec![port],
        ..Default::default()
    };
    pb_sec::Authorization {
        name: name.into(),
        namespace: "bookinfo".into(),
        scope: pb_sec::Scope::Namespace as i32,
        action: pb_sec::Action::Deny as i32,
        rules: vec![pb_sec::Rule { clauses: vec![pb_sec::Clause { matches: vec![m] }] }],
        ..Default::default()
    }
}

fn response(type_url: &str, resources: Vec<(&str, Vec<u8>)>, removed: &[&str]) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: "n1".into(),
        resources: resources
            .into_iter()
            .map(|(name, value)| Resource {
                name: name.into(),
                version: format!("v-{name}-{}", value.len()),
                resource: Some(prost_types::Any { type_url: type_url.into(), value }),
                ..Default::default()
            })
            .collect(),
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn workload_converts_with_its_addresses_services_and_kind() {
    let AddressResource::Workload(w) = address(&wrap(pb_workload("uid-1", [10, 10, 1, 5]))).unwrap() else {
        panic!("not a workload")
    };
    assert_eq!(w.uid, "uid-1");
    assert_eq!(w.workload_ips, vec!["10.10.1.5".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(w.protocol, WorkloadProtocol::Hbone);
    assert_eq!(w.services["bookinfo/reviews.bookinfo.svc.cluster.local"][&9080], 9080);
    assert_eq!(w.workload_type, "deployment");
    assert_eq!((w.canonical_name.as_str(), w.canonical_revision.as_str()), ("reviews", "v1"));
    assert_eq!(w.authorization_policies, vec!["bookinfo/allow-productpage".to_string()]);
}

#[test]
fn workload_locality_converts_and_waypoint_balancing_reads_it() {
    let mut w = pb_workload("uid-1", [10, 10, 1, 5]);
    w.locality = Some(pb::Locality { region: "eu".into(), zone: "eu-1a".into(), subzone: String::new() });
    let AddressResource::Workload(w) = address(&wrap(w)).unwrap() else { panic!("not a workload") };
    assert_eq!(w.locality(), ("eu", "eu-1a", ""));
    let AddressResource::Workload(none) = address(&wrap(pb_workload("uid-2", [10, 10, 1, 6]))).unwrap() else {
        panic!("not a workload")
    };
    assert_eq!(none.locality(), ("", "", ""));
}

#[test]
fn service_converts_with_network_qualified_vips_and_ports() {
    let s = pb::Service {
        name: "reviews".into(),
        namespace: "bookinfo".into(),
        hostname: "reviews.bookinfo.svc.cluster.local".into(),
        addresses: vec![pb::NetworkAddress {
            network: "net1".into(),
            address: vec![10, 96, 0, 7],
            ..Default::default()
        }],
        ports: vec![pb::Port { service_port: 80, target_port: 9080, app_protocol: 0 }],
        subject_alt_names: vec!["spiffe://cluster.local/ns/bookinfo/sa/reviews".into()],
        ..Default::default()
    };
    let bytes = pb::Address { r#type: Some(pb::address::Type::Service(s)) }.encode_to_vec();
    let AddressResource::Service(s) = address(&bytes).unwrap() else { panic!("not a service") };
    assert_eq!(s.vips, vec!["net1/10.96.0.7".to_string()]);
    assert_eq!(s.ports[&80], 9080);
    assert_eq!(s.vip_addrs().unwrap(), vec!["10.96.0.7".parse::<std::net::IpAddr>().unwrap()]);
}

#[test]
fn workload_with_a_malformed_address_is_rejected_with_the_reason() {
    let mut w = pb_workload("uid-1", [10, 0, 0, 1]);
    w.addresses = vec![vec![1, 2, 3]];
    let err = address(&wrap(w)).unwrap_err();
    assert!(err.contains("3 bytes"), "{err}");
}

#[test]
fn authorization_converts_rules_clauses_and_matches() {
    let p = authorization(&deny_policy("deny-evil", 9080).encode_to_vec()).unwrap();
    assert_eq!((p.name.as_str(), p.namespace.as_str()), ("deny-evil", "bookinfo"));
    assert_eq!(p.scope, PolicyScope::Namespace);
    assert_eq!(p.action, PolicyAction::Deny);
    let m = &p.rules[0][0][0];
    assert_eq!(m.principals, vec![StringMatch::Prefix("cluster.local/ns/evil".into())]);
    assert_eq!(m.destination_ports, vec![9080]);
}

#[test]
fn authorization_with_a_port_out_of_range_is_rejected() {
    let err = authorization(&deny_policy("bad", 70000).encode_to_vec()).unwrap_err();
    assert!(err.contains("70000"), "{err}");
}

#[test]
fn a_bad_address_update_keeps_the_previous_version_and_is_named() {
    let mut r = Resources::default();
    let good = wrap(pb_workload("uid-1", [10, 0, 0, 1]));
    assert!(r.apply(0, &response(ADDRESS_TYPE_URL, vec![("uid-1", good)], &[])).is_empty());
    let mut bad = pb_workload("uid-1", [10, 0, 0, 2]);
    bad.tunnel_protocol = 2; // LEGACY_ISTIO_MTLS: not supported
    let errors = r.apply(0, &response(ADDRESS_TYPE_URL, vec![("uid-1", wrap(bad))], &[]));
    assert_eq!(errors.len(), 1);
    assert!(errors[0].starts_with("uid-1: "), "{errors:?}");
    let cfg = r.config();
    assert_eq!(cfg.workloads[0].workload_ips, vec!["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]);
}

#[test]
fn an_unreadable_new_policy_fails_closed_until_fixed() {
    let mut r = Resources::default();
    let errors = r.apply(1, &response(AUTHORIZATION_TYPE_URL, vec![("bookinfo/bad", vec![0xff, 0xff])], &[]));
    assert_eq!(errors.len(), 1);
    let cfg = r.config();
    assert!(cfg.policies.is_empty());
    assert_eq!(cfg.invalid_policies.len(), 1);
    assert_eq!(cfg.invalid_policies[0].namespace.as_deref(), Some("bookinfo"));
    // Fixed: the marker is replaced by the policy.
    let good = deny_policy("bad", 80).encode_to_vec();
    assert!(r.apply(1, &response(AUTHORIZATION_TYPE_URL, vec![("bookinfo/bad", good)], &[])).is_empty());
    let cfg = r.config();
    assert_eq!((cfg.policies.len(), cfg.invalid_policies.len()), (1, 0));
}

#[test]
fn removed_resources_leave_the_state() {
    let mut r = Resources::default();
    let w1 = wrap(pb_workload("uid-1", [10, 0, 0, 1]));
    let w2 = wrap(pb_workload("uid-2", [10, 0, 0, 2]));
    r.apply(0, &response(ADDRESS_TYPE_URL, vec![("uid-1", w1), ("uid-2", w2)], &[]));
    r.apply(0, &response(ADDRESS_TYPE_URL, vec![], &["uid-1"]));
    let cfg = r.config();
    assert_eq!(cfg.workloads.iter().map(|w| w.uid.as_str()).collect::<Vec<_>>(), vec!["uid-2"]);
    assert_eq!(r.versions(0).keys().collect::<Vec<_>>(), vec!["uid-2"]);
}

#[test]
fn a_resource_of_the_wrong_type_is_rejected() {
    let mut r = Resources::default();
    let mut resp = response(ADDRESS_TYPE_URL, vec![("x", vec![])], &[]);
    resp.resources[0].resource.as_mut().unwrap().type_url = AUTHORIZATION_TYPE_URL.into();
    let errors = r.apply(0, &resp);
    assert!(errors[0].contains("inside a"), "{errors:?}");
}

fn address_any(w: pb::Workload) -> prost_types::Any {
    prost_types::Any { type_url: ADDRESS_TYPE_URL.into(), value: wrap(w) }
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Against the controller's real ADS server over TLS: a resource the agent cannot accept is
/// NACKed (counted on both sides) and the agent keeps serving the version it had.
#[tokio::test]
async fn a_resource_that_fails_validation_is_nacked_and_the_previous_version_stays() {
    use std::sync::Arc;

    use crate::controller::ads::{AdsServer, ResourceSnapshot};
    use crate::controller::ca::CaServer;
    use crate::controller::grpc::testing::{authenticator, test_ca, TestServer};
    use crate::controller::grpc::CONTROLLER_DNS_NAME;
    use crate::grpc::ControlPlaneEndpoint;
    use crate::state::StateStore;
    use crate::xds::{run, XdsConfig, XdsStats};

    let ca = test_ca();
    let mut first = ResourceSnapshot::new(1);
    first.insert("uid-1", address_any(pb_workload("uid-1", [10, 0, 0, 1])));
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(first));
    let ads = AdsServer::new(rx).with_authenticator(authenticator());
    let ca_server =
        CaServer::new(ca.clone(), authenticator(), Arc::new(|_: &str, _: &crate::identity::Identity| Ok(())));
    let server = TestServer::start(&ca, ads.clone(), ca_server).await;
    let token = std::env::temp_dir().join(format!("xds-nack-token-{}", std::process::id()));
    std::fs::write(&token, "token-node-a").unwrap();
    let cfg = XdsConfig {
        server: ControlPlaneEndpoint {
            address: format!("https://{}", server.addr),
            root_pem: Some(ca.trust_bundle().to_pem().into_bytes()),
            server_name: Some(CONTROLLER_DNS_NAME.into()),
            token_path: Some(token.clone()),
        },
        node_name: "node-a".into(),
        cluster_id: "Kubernetes".into(),
    };
    let store = Arc::new(StateStore::awaiting_sync("node-a"));
    let stats = Arc::new(XdsStats::default());
    let client = tokio::spawn(run(cfg, store.clone(), stats.clone()));
    eventually("the first sync", || store.is_synced()).await;
    let ip = |s: &StateStore| s.snapshot().config.workloads.first().map(|w| w.workload_ips.clone());
    assert_eq!(ip(&store), Some(vec!["10.0.0.1".parse().unwrap()]));

    let mut bad = pb_workload("uid-1", [10, 0, 0, 2]);
    bad.tunnel_protocol = 2; // LEGACY_ISTIO_MTLS: not something this agent can serve
    let mut second = ResourceSnapshot::new(2);
    second.insert("uid-1", address_any(bad));
    tx.send_replace(Arc::new(second));
    eventually("the NACK at the server", || ads.nacks_total() == 1).await;
    assert_eq!(stats.nacks[0].load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(ip(&store), Some(vec!["10.0.0.1".parse().unwrap()]), "the previous version stays in force");

    client.abort();
    let _ = std::fs::remove_file(token);
}
