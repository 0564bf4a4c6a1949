//! The model as xDS resources: names, fields, and that the packed resources decode back.
use prost::Message;
use ztunnel_proto::security as xsec;
use ztunnel_proto::workload as xwl;

use super::*;
use crate::controller::translate::translate;

fn demo() -> Model {
    crate::controller::load(&demo_dir(), Options::default()).expect("deploy/demo")
}

#[test]
fn workload_resource_is_named_by_uid_and_decodes_with_its_fields() {
    let m = demo();
    let anys = translate(&m).address_anys();
    let productpage = m.workloads.values().find(|w| w.workload_name == "productpage-v1").unwrap();
    assert!(productpage.uid.starts_with("Kubernetes//Pod/bookinfo/productpage-v1-"), "{}", productpage.uid);
    let any = &anys[&productpage.uid];
    assert_eq!(any.type_url, ztunnel_proto::ADDRESS_TYPE_URL);
    let Some(xwl::address::Type::Workload(w)) = xwl::Address::decode(any.value.as_slice()).unwrap().r#type else {
        panic!("not a workload")
    };
    assert_eq!(w.uid, productpage.uid);
    assert_eq!((w.name.as_str(), w.namespace.as_str()), (productpage.name.as_str(), "bookinfo"));
    assert_eq!(w.addresses, vec![vec![10, 244, 0, 10]]);
    assert_eq!(w.tunnel_protocol, xwl::TunnelProtocol::Hbone as i32);
    assert_eq!(w.service_account, "bookinfo-productpage");
    assert_eq!(w.node, "node-a");
    assert_eq!((w.canonical_name.as_str(), w.canonical_revision.as_str()), ("productpage", "v1"));
    assert_eq!((w.workload_name.as_str(), w.workload_type), ("productpage-v1", xwl::WorkloadType::Pod as i32));
    assert_eq!(w.trust_domain, "", "the default trust domain is left out, as istiod does");
    assert_eq!(w.cluster_id, "Kubernetes");
    let ports = &w.services["bookinfo/productpage.bookinfo.svc.cluster.local"].ports;
    assert_eq!(
        ports,
        &vec![xwl::Port { service_port: 9080, target_port: 9080, app_protocol: xwl::AppProtocol::Http11 as i32 }]
    );
}

#[test]
fn service_resource_is_named_namespace_slash_hostname() {
    let resources = translate(&demo());
    let Some(xwl::address::Type::Service(s)) =
        &resources.addresses["bookinfo/reviews.bookinfo.svc.cluster.local"].r#type
    else {
        panic!("not a service")
    };
    assert_eq!((s.name.as_str(), s.namespace.as_str()), ("reviews", "bookinfo"));
    assert_eq!(s.hostname, "reviews.bookinfo.svc.cluster.local");
    assert_eq!(
        s.addresses,
        vec![xwl::NetworkAddress { network: String::new(), address: vec![10, 96, 0, 12], length: None }]
    );
    assert_eq!(s.ports[0].service_port, 9080);
    assert!(s.canonical);
    assert_eq!(resources.addresses.len(), 6 + 4);
}

#[test]
fn authorization_resource_decodes_with_rules() {
    let m = demo();
    let anys = translate(&m).authorization_anys();
    let any = &anys["bookinfo/reviews-from-productpage"];
    assert_eq!(any.type_url, ztunnel_proto::AUTHORIZATION_TYPE_URL);
    let a = xsec::Authorization::decode(any.value.as_slice()).unwrap();
    assert_eq!((a.name.as_str(), a.namespace.as_str()), ("reviews-from-productpage", "bookinfo"));
    assert_eq!(a.scope, xsec::Scope::WorkloadSelector as i32);
    assert_eq!(a.action, xsec::Action::Allow as i32);
    let clauses = &a.rules[0].clauses;
    assert_eq!(clauses[0].matches[0].destination_ports, vec![9080]);
    let exact = xsec::string_match::MatchType::Exact("cluster.local/ns/bookinfo/sa/bookinfo-productpage".into());
    assert_eq!(clauses[1].matches[0].principals, vec![xsec::StringMatch { match_type: Some(exact) }]);
}

#[test]
fn presence_ip_and_waypoint_fields_translate() {
    let objects = yaml(
        "
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: istio-system}
        spec: {mtls: {mode: STRICT}}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: ips, namespace: ns}
        spec:
          rules: [{from: [{source: {ipBlocks: [10.1.0.0/16, 'fd00::1']}}]}]
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: wp, namespace: ns, labels: {istio.io/waypoint-for: all}}
        spec: {gatewayClassName: istio-waypoint}
        status:
          addresses: [{type: IPAddress, value: 10.0.0.99}]
        ",
    );
    let text = objects + &pod("ns", "a", "10.0.0.1", &[("istio.io/use-waypoint", "wp")]);
    let r = translate(&build(&text));
    let strict = &r.authorizations["istio-system/istio_converted_static_strict"];
    let presence = xsec::StringMatch { match_type: Some(xsec::string_match::MatchType::Presence(())) };
    assert_eq!(strict.rules[0].clauses[0].matches[0].not_principals, vec![presence]);
    assert_eq!(strict.action, xsec::Action::Deny as i32);
    let ips = &r.authorizations["ns/ips"].rules[0].clauses[0].matches[0].source_ips;
    let v6 = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec();
    assert_eq!(
        ips,
        &vec![xsec::Address { address: vec![10, 1, 0, 0], length: 16 }, xsec::Address { address: v6, length: 128 }]
    );
    let Some(xwl::address::Type::Workload(w)) = &r.addresses["Kubernetes//Pod/ns/a"].r#type else { panic!() };
    let wp = w.waypoint.as_ref().expect("waypoint");
    assert_eq!(wp.hbone_mtls_port, 15008);
    let expected = xwl::gateway_address::Destination::Address(xwl::NetworkAddress {
        network: String::new(),
        address: vec![10, 0, 0, 99],
        length: None,
    });
    assert_eq!(wp.destination, Some(expected));
    assert_eq!(w.authorization_policies, vec!["istio-system/istio_converted_static_strict".to_string()]);
}

#[test]
fn packed_addresses_do_not_depend_on_map_order() {
    // A workload in several services: its `services` map must encode the same way every time.
    let svc = |name: &str, ip: &str| {
        yaml(&format!(
            "
            ---
            apiVersion: v1
            kind: Service
            metadata: {{name: {name}, namespace: ns}}
            spec: {{clusterIP: {ip}, selector: {{app: web}}, ports: [{{port: 80}}]}}
            "
        ))
    };
    let text = (1..=8).map(|i| svc(&format!("s{i}"), &format!("10.96.0.{i}"))).collect::<String>()
        + &pod("ns", "web", "10.0.0.1", &[("app", "web")]);
    let m = build(&text);
    let uid = "Kubernetes//Pod/ns/web";
    let first = translate(&m).address_anys()[uid].clone();
    for _ in 0..16 {
        assert_eq!(translate(&m).address_anys()[uid], first);
    }
    let decoded = xwl::Address::decode(first.value.as_slice()).unwrap();
    assert_eq!(decoded, translate(&m).addresses[uid], "decodes to the same message");
}

fn xds_workload(m: &Model, name: &str) -> xwl::Workload {
    let w = workload(m, "ns", name);
    let any = &translate(m).address_anys()[&w.uid];
    let Some(xwl::address::Type::Workload(w)) = xwl::Address::decode(any.value.as_slice()).unwrap().r#type else {
        panic!("not a workload")
    };
    w
}

#[test]
fn pod_locality_comes_from_its_nodes_topology_labels_or_its_istio_locality_label() {
    let node = "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels:\n    \
                topology.kubernetes.io/region: eu-west\n    topology.kubernetes.io/zone: eu-west-1b\n    \
                topology.istio.io/subzone: rack3\n";
    let m = build(&format!(
        "{node}{}{}",
        pod("ns", "on-node", "10.0.0.1", &[]),
        pod("ns", "labelled", "10.0.0.2", &[("istio-locality", "us-east.us-east-1a")])
    ));
    assert_no_errors(&m);
    let on_node = xds_workload(&m, "on-node").locality.expect("locality from node-a");
    assert_eq!(
        (on_node.region.as_str(), on_node.zone.as_str(), on_node.subzone.as_str()),
        ("eu-west", "eu-west-1b", "rack3")
    );
    let labelled = xds_workload(&m, "labelled").locality.expect("locality from the label");
    assert_eq!(
        (labelled.region.as_str(), labelled.zone.as_str(), labelled.subzone.as_str()),
        ("us-east", "us-east-1a", "")
    );
}

#[test]
fn a_pod_on_an_unknown_node_has_no_locality() {
    let m = build(&pod("ns", "nowhere", "10.0.0.1", &[]));
    assert_eq!(xds_workload(&m, "nowhere").locality, None);
}

/// Name → version of every resource of `type_url`.
fn versions(s: &crate::controller::ads::ResourceSnapshot, type_url: &str) -> Vec<(String, String)> {
    s.resources(type_url).map(|r| r.iter().map(|(n, v)| (n.clone(), v.version.clone())).collect()).unwrap_or_default()
}

#[test]
fn a_snapshot_built_on_the_previous_one_equals_a_full_translation() {
    use crate::controller::runtime::snapshot;
    let before = demo();
    let mut files = vec![];
    for e in std::fs::read_dir(demo_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            files.push((p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read_to_string(&p).unwrap()));
        }
    }
    // The edit: a DENY policy, and a new Service selecting the productpage pods.
    files.push((
        "edit.yaml".into(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-x, namespace: bookinfo}\n\
         spec:\n  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [x]}\n---\napiVersion: v1\nkind: Service\n\
         metadata: {name: extra, namespace: bookinfo}\nspec:\n  clusterIP: 10.96.9.9\n  selector: {app: productpage}\n  \
         ports:\n  - port: 81\n    targetPort: 9080\n"
            .into(),
    ));
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
    let after = build_files(&refs);
    assert_no_errors(&after);
    let first = snapshot(&before, None, 1);
    let incremental = snapshot(&after, Some((&before, &first)), 2);
    let full = snapshot(&after, None, 2);
    for t in [ztunnel_proto::ADDRESS_TYPE_URL, ztunnel_proto::AUTHORIZATION_TYPE_URL] {
        assert_eq!(versions(&incremental, t), versions(&full, t), "{t}");
        assert_ne!(versions(&first, t), versions(&full, t), "the edit changed {t} resources");
    }
    let productpage = after.workloads.values().find(|w| w.workload_name == "productpage-v1").unwrap();
    assert_ne!(
        first.get(ztunnel_proto::ADDRESS_TYPE_URL, &productpage.uid).unwrap().version,
        incremental.get(ztunnel_proto::ADDRESS_TYPE_URL, &productpage.uid).unwrap().version,
        "a workload the new Service selects is translated again"
    );
}
