//! Protobuf compatibility: decode and re-encode Address, Workload, Service, Authorization, ZDS,
//! CA and delta xDS messages built byte by byte from Istio's (and Envoy's) field numbers. If a
//! field number or type drifts from the upstream schema, decoding or the byte-equal re-encode fails.
//! Fields are written in field-number order, which is prost's canonical encoding order.

use prost::Message;
use ztunnel_proto::{ca, discovery, security, workload, zds, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

/// Hand-written protobuf wire encoder: just varints, tags and length-delimited fields.
#[derive(Default)]
struct Wire(Vec<u8>);

const VARINT: u32 = 0;
const LEN: u32 = 2;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

impl Wire {
    fn new() -> Self {
        Self::default()
    }

    fn tag(mut self, field: u32, wire_type: u32) -> Self {
        varint(u64::from(field << 3 | wire_type), &mut self.0);
        self
    }

    /// Varint field (int32/int64/uint32/bool/enum).
    fn int(self, field: u32, v: u64) -> Self {
        let mut w = self.tag(field, VARINT);
        varint(v, &mut w.0);
        w
    }

    /// Length-delimited field (bytes, string, embedded message, packed repeated).
    fn bytes(self, field: u32, b: &[u8]) -> Self {
        let mut w = self.tag(field, LEN);
        varint(b.len() as u64, &mut w.0);
        w.0.extend_from_slice(b);
        w
    }

    fn str(self, field: u32, s: &str) -> Self {
        self.bytes(field, s.as_bytes())
    }

    fn msg(self, field: u32, m: Wire) -> Self {
        self.bytes(field, &m.0)
    }

    /// Packed repeated varints (proto3 default for repeated scalars).
    fn packed(self, field: u32, vals: &[u64]) -> Self {
        let mut body = Vec::new();
        for v in vals {
            varint(*v, &mut body);
        }
        self.bytes(field, &body)
    }

    fn build(self) -> Vec<u8> {
        self.0
    }
}

/// Decodes `bytes` as `M`, checks prost re-encodes it to exactly the same bytes, returns it.
fn roundtrip<M: Message + Default>(bytes: &[u8]) -> M {
    let m = M::decode(bytes).expect("decode");
    assert_eq!(m.encode_to_vec(), bytes, "re-encoded bytes differ from the hand-built ones");
    m
}

const SVC_KEY: &str = "ns/svc.ns.svc.cluster.local";

/// Port{service_port=1, target_port=2}.
fn port_wire(service_port: u64, target_port: u64) -> Wire {
    Wire::new().int(1, service_port).int(2, target_port)
}

/// istio.workload.Workload with the fields ztunnel relies on, in field-number order.
fn workload_wire() -> Wire {
    let services_entry = Wire::new().str(1, SVC_KEY).msg(2, Wire::new().msg(1, port_wire(80, 8080)));
    Wire::new()
        .str(1, "pod-a")
        .str(2, "ns")
        .bytes(3, &[10, 0, 0, 7])
        .int(5, 1) // tunnel_protocol = HBONE
        .str(6, "cluster.local")
        .str(7, "sa-a")
        .str(9, "node-1")
        .str(10, "app-a")
        .str(16, "ns/deny-all")
        .str(18, "Kubernetes")
        .str(20, "Kubernetes//Pod/ns/pod-a")
        .msg(22, services_entry)
}

#[test]
fn workload_decodes_istio_field_numbers_and_reencodes_identically() {
    let w: workload::Workload = roundtrip(&workload_wire().build());
    assert_eq!(w.uid, "Kubernetes//Pod/ns/pod-a");
    assert_eq!(w.name, "pod-a");
    assert_eq!(w.namespace, "ns");
    assert_eq!(w.addresses, vec![vec![10, 0, 0, 7]]);
    assert_eq!(w.tunnel_protocol(), workload::TunnelProtocol::Hbone);
    assert_eq!(w.trust_domain, "cluster.local");
    assert_eq!(w.service_account, "sa-a");
    assert_eq!(w.node, "node-1");
    assert_eq!(w.canonical_name, "app-a");
    assert_eq!(w.authorization_policies, vec!["ns/deny-all".to_string()]);
    assert_eq!(w.cluster_id, "Kubernetes");
    let ports = &w.services[SVC_KEY].ports;
    assert_eq!(ports.len(), 1);
    assert_eq!((ports[0].service_port, ports[0].target_port), (80, 8080));
}

#[test]
fn address_carries_workload_in_oneof_field_1() {
    let bytes = Wire::new().msg(1, workload_wire()).build();
    let a: workload::Address = roundtrip(&bytes);
    match a.r#type {
        Some(workload::address::Type::Workload(w)) => assert_eq!(w.uid, "Kubernetes//Pod/ns/pod-a"),
        other => panic!("expected a workload, got {other:?}"),
    }
}

#[test]
fn service_decodes_istio_field_numbers_and_reencodes_identically() {
    let bytes = Wire::new()
        .str(1, "svc")
        .str(2, "ns")
        .str(3, "svc.ns.svc.cluster.local")
        .msg(4, Wire::new().str(1, "net-1").bytes(2, &[10, 96, 0, 10]))
        .msg(5, port_wire(80, 8080))
        .str(6, "spiffe://cluster.local/ns/ns/sa/svc")
        .build();
    let s: workload::Service = roundtrip(&bytes);
    assert_eq!((s.name.as_str(), s.namespace.as_str()), ("svc", "ns"));
    assert_eq!(s.hostname, "svc.ns.svc.cluster.local");
    assert_eq!(s.addresses.len(), 1);
    assert_eq!(s.addresses[0].network, "net-1");
    assert_eq!(s.addresses[0].address, vec![10, 96, 0, 10]);
    assert_eq!((s.ports[0].service_port, s.ports[0].target_port), (80, 8080));
    assert_eq!(s.subject_alt_names, vec!["spiffe://cluster.local/ns/ns/sa/svc".to_string()]);
}

#[test]
fn address_carries_service_in_oneof_field_2() {
    let bytes = Wire::new().msg(2, Wire::new().str(1, "svc").str(3, "svc.ns.svc.cluster.local")).build();
    let a: workload::Address = roundtrip(&bytes);
    match a.r#type {
        Some(workload::address::Type::Service(s)) => assert_eq!(s.hostname, "svc.ns.svc.cluster.local"),
        other => panic!("expected a service, got {other:?}"),
    }
}

#[test]
fn authorization_decodes_rules_clauses_matches_and_reencodes_identically() {
    let m = Wire::new()
        .msg(1, Wire::new().str(2, "prod-")) // namespaces: prefix
        .msg(3, Wire::new().str(1, "cluster.local/ns/ns/sa/client")) // principals: exact
        .msg(4, Wire::new().bytes(4, &[])) // not_principals: presence (Empty)
        .packed(9, &[80, 443]); // destination_ports
    let bytes = Wire::new()
        .str(1, "deny-all")
        .str(2, "ns")
        .int(3, 1) // scope = NAMESPACE
        .int(4, 1) // action = DENY
        .msg(5, Wire::new().msg(1, Wire::new().msg(2, m)))
        .build();
    let a: security::Authorization = roundtrip(&bytes);
    assert_eq!((a.name.as_str(), a.namespace.as_str()), ("deny-all", "ns"));
    assert_eq!(a.scope(), security::Scope::Namespace);
    assert_eq!(a.action(), security::Action::Deny);
    let m = &a.rules[0].clauses[0].matches[0];
    use security::string_match::MatchType;
    assert_eq!(m.namespaces[0].match_type, Some(MatchType::Prefix("prod-".into())));
    assert_eq!(m.principals[0].match_type, Some(MatchType::Exact("cluster.local/ns/ns/sa/client".into())));
    assert_eq!(m.not_principals[0].match_type, Some(MatchType::Presence(())));
    assert_eq!(m.destination_ports, vec![80, 443]);
}

#[test]
fn zds_add_request_carries_uid_and_workload_info() {
    let info = Wire::new().str(1, "pod-a").str(2, "ns").str(3, "sa-a");
    let bytes = Wire::new().msg(1, Wire::new().str(1, "uid-1").msg(2, info)).build();
    let r: zds::WorkloadRequest = roundtrip(&bytes);
    match r.payload {
        Some(zds::workload_request::Payload::Add(add)) => {
            assert_eq!(add.uid, "uid-1");
            let info = add.workload_info.expect("workload_info");
            assert_eq!((info.name.as_str(), info.namespace.as_str()), ("pod-a", "ns"));
            assert_eq!(info.service_account, "sa-a");
        }
        other => panic!("expected add, got {other:?}"),
    }
}

#[test]
fn zds_del_request_uses_uid_field_2() {
    let bytes = Wire::new().msg(2, Wire::new().str(2, "uid-1")).build();
    let r: zds::WorkloadRequest = roundtrip(&bytes);
    assert_eq!(r.payload, Some(zds::workload_request::Payload::Del(zds::DelWorkload { uid: "uid-1".into() })));
}

#[test]
fn zds_snapshot_sent_is_empty_message_in_field_3() {
    let bytes = Wire::new().bytes(3, &[]).build();
    let r: zds::WorkloadRequest = roundtrip(&bytes);
    assert_eq!(r.payload, Some(zds::workload_request::Payload::SnapshotSent(zds::SnapshotSent {})));
}

#[test]
fn zds_keep_request_is_field_5() {
    let bytes = Wire::new().msg(5, Wire::new().str(1, "uid-1")).build();
    let r: zds::WorkloadRequest = roundtrip(&bytes);
    assert_eq!(r.payload, Some(zds::workload_request::Payload::Keep(zds::KeepWorkload { uid: "uid-1".into() })));
}

#[test]
fn zds_hello_carries_version_v1() {
    let h: zds::ZdsHello = roundtrip(&Wire::new().int(1, 1).build());
    assert_eq!(h.version(), zds::Version::V1);
}

#[test]
fn zds_response_ack_carries_error_text() {
    let bytes = Wire::new().msg(1, Wire::new().str(1, "no netns fd")).build();
    let r: zds::WorkloadResponse = roundtrip(&bytes);
    assert_eq!(r.payload, Some(zds::workload_response::Payload::Ack(zds::Ack { error: "no netns fd".into() })));
}

#[test]
fn zds_success_ack_is_empty_ack() {
    let r: zds::WorkloadResponse = roundtrip(&Wire::new().bytes(1, &[]).build());
    assert_eq!(r.payload, Some(zds::workload_response::Payload::Ack(zds::Ack::default())));
}

#[test]
fn ca_request_carries_csr_validity_and_struct_metadata() {
    let spiffe = "spiffe://cluster.local/ns/ns/sa/sa-a";
    // Struct{fields: {"ImpersonatedIdentity": Value{string_value(3)}}}
    let entry = Wire::new().str(1, "ImpersonatedIdentity").msg(2, Wire::new().str(3, spiffe));
    let bytes = Wire::new()
        .str(1, "-----BEGIN CERTIFICATE REQUEST-----\n")
        .int(3, 86_400)
        .msg(4, Wire::new().msg(1, entry))
        .build();
    let r: ca::IstioCertificateRequest = roundtrip(&bytes);
    assert_eq!(r.csr, "-----BEGIN CERTIFICATE REQUEST-----\n");
    assert_eq!(r.validity_duration, 86_400);
    let v = &r.metadata.expect("metadata").fields["ImpersonatedIdentity"];
    assert_eq!(v.kind, Some(prost_types::value::Kind::StringValue(spiffe.into())));
}

#[test]
fn ca_response_carries_cert_chain_in_order() {
    let bytes = Wire::new().str(1, "LEAF").str(1, "ROOT").build();
    let r: ca::IstioCertificateResponse = roundtrip(&bytes);
    assert_eq!(r.cert_chain, vec!["LEAF".to_string(), "ROOT".to_string()]);
}

#[test]
fn delta_request_subscribes_with_node_identity() {
    let node =
        Wire::new().str(1, "sidecar~10.0.0.1~ztunnel-x.istio-system~istio-system.svc.cluster.local").str(2, "c1");
    let bytes = Wire::new()
        .msg(1, node)
        .str(2, ADDRESS_TYPE_URL)
        .str(3, "*")
        .msg(5, Wire::new().str(1, "ns/svc.ns.svc.cluster.local").str(2, "v1"))
        .build();
    let r: discovery::DeltaDiscoveryRequest = roundtrip(&bytes);
    let node = r.node.expect("node");
    assert!(node.id.starts_with("sidecar~10.0.0.1~"));
    assert_eq!(node.cluster, "c1");
    assert_eq!(r.type_url, ADDRESS_TYPE_URL);
    assert_eq!(r.resource_names_subscribe, vec!["*".to_string()]);
    assert_eq!(r.initial_resource_versions["ns/svc.ns.svc.cluster.local"], "v1");
}

#[test]
fn delta_request_nack_carries_nonce_and_error_detail() {
    let bytes = Wire::new()
        .str(2, AUTHORIZATION_TYPE_URL)
        .str(6, "nonce-1")
        .msg(7, Wire::new().int(1, 3).str(2, "bad policy"))
        .build();
    let r: discovery::DeltaDiscoveryRequest = roundtrip(&bytes);
    assert_eq!(r.type_url, AUTHORIZATION_TYPE_URL);
    assert_eq!(r.response_nonce, "nonce-1");
    let e = r.error_detail.expect("error_detail");
    assert_eq!((e.code, e.message.as_str()), (3, "bad policy"));
}

#[test]
fn delta_response_carries_address_resource_as_any() {
    let address = Wire::new().msg(1, workload_wire()).build();
    let any = Wire::new().str(1, ADDRESS_TYPE_URL).bytes(2, &address);
    let resource = Wire::new().str(1, "v7").msg(2, any).str(3, "Kubernetes//Pod/ns/pod-a");
    let bytes = Wire::new().str(1, "sys-1").msg(2, resource).str(4, ADDRESS_TYPE_URL).str(5, "nonce-1").build();
    let r: discovery::DeltaDiscoveryResponse = roundtrip(&bytes);
    assert_eq!(r.system_version_info, "sys-1");
    assert_eq!((r.type_url.as_str(), r.nonce.as_str()), (ADDRESS_TYPE_URL, "nonce-1"));
    let res = &r.resources[0];
    assert_eq!((res.name.as_str(), res.version.as_str()), ("Kubernetes//Pod/ns/pod-a", "v7"));
    let any = res.resource.as_ref().expect("resource");
    assert_eq!(any.type_url, ADDRESS_TYPE_URL);
    let a = workload::Address::decode(any.value.as_slice()).expect("address");
    assert!(matches!(a.r#type, Some(workload::address::Type::Workload(w)) if w.name == "pod-a"));
}

#[test]
fn delta_response_lists_removed_resources_in_field_6() {
    let bytes = Wire::new().str(4, ADDRESS_TYPE_URL).str(5, "nonce-2").str(6, "Kubernetes//Pod/ns/gone").build();
    let r: discovery::DeltaDiscoveryResponse = roundtrip(&bytes);
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, vec!["Kubernetes//Pod/ns/gone".to_string()]);
}

#[test]
fn type_url_constants_name_the_istio_messages() {
    assert_eq!(ADDRESS_TYPE_URL, "type.googleapis.com/istio.workload.Address");
    assert_eq!(AUTHORIZATION_TYPE_URL, "type.googleapis.com/istio.security.Authorization");
}

#[test]
fn grpc_service_names_match_envoy_and_istio() {
    assert_eq!(
        discovery::aggregated_discovery_service_server::SERVICE_NAME,
        "envoy.service.discovery.v3.AggregatedDiscoveryService"
    );
    assert_eq!(ca::istio_certificate_service_server::SERVICE_NAME, "istio.v1.auth.IstioCertificateService");
}
