//! The model as xDS resources: `istio.workload.Address` (a Workload or a Service) and `istio.security.Authorization`,
//! each under the resource name istiod gives it (a workload's uid, `<namespace>/<hostname>` for a service,
//! `<namespace>/<name>` for a policy). Resources are returned in name order so the ADS server can diff two
//! versions and send only what changed.
//!
//! Packed resources ([`Resources::address_anys`]) are encoded deterministically, so the ADS server may version a
//! resource by a hash of its bytes: `Workload.services` is a protobuf map, a `HashMap` in the generated code whose
//! iteration (and so plain `encode`) order changes between instances; it is encoded here in key order.
use std::collections::BTreeMap;
use std::net::IpAddr;

use prost::Message;
use ztunnel_proto::security as xsec;
use ztunnel_proto::workload as xwl;

use crate::policy::{Authorization, Cidr, Match, PolicyAction, PolicyScope, StringMatch};

use super::model::{AppProtocol, IpFamilies, LbMode, LbScope, Model, PortMapping, Service, TunnelProtocol, Workload};
use super::waypoint::{WaypointAddress, WaypointDestination};

/// All resources of one model, by resource name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    /// Workloads (by uid) and services (by `<namespace>/<hostname>`).
    pub addresses: BTreeMap<String, xwl::Address>,
    /// Policies by `<namespace>/<name>`.
    pub authorizations: BTreeMap<String, xsec::Authorization>,
}

impl Resources {
    /// Every address resource packed as `Any` (type URL [`ztunnel_proto::ADDRESS_TYPE_URL`]), with a byte encoding
    /// that depends only on the content (see the module docs).
    pub fn address_anys(&self) -> BTreeMap<String, prost_types::Any> {
        self.addresses.iter().map(|(k, v)| (k.clone(), address_any(v))).collect()
    }

    /// Every authorization resource packed as `Any` (type URL [`ztunnel_proto::AUTHORIZATION_TYPE_URL`]).
    pub fn authorization_anys(&self) -> BTreeMap<String, prost_types::Any> {
        self.authorizations.iter().map(|(k, v)| (k.clone(), to_any(ztunnel_proto::AUTHORIZATION_TYPE_URL, v))).collect()
    }
}

/// Packs a message for a discovery response (for messages without maps; addresses use [`encode_address`]).
pub fn to_any(type_url: &str, m: &impl Message) -> prost_types::Any {
    prost_types::Any { type_url: type_url.to_string(), value: m.encode_to_vec() }
}

/// `Workload.services` (field 22) alone, as a sorted map, so that its entries encode in key order.
#[derive(Clone, PartialEq, Message)]
struct SortedServices {
    #[prost(btree_map = "string, message", tag = "22")]
    services: BTreeMap<String, xwl::PortList>,
}

/// Encodes an address with a workload's `services` map in key order. Protobuf allows a message's fields in any
/// order, so the workload is written without the map, then the map entries; decoders see the same message.
pub fn encode_address(a: &xwl::Address) -> Vec<u8> {
    let Some(xwl::address::Type::Workload(w)) = &a.r#type else {
        return a.encode_to_vec();
    };
    let mut inner = xwl::Workload { services: Default::default(), ..w.clone() }.encode_to_vec();
    let sorted = SortedServices { services: w.services.iter().map(|(k, v)| (k.clone(), v.clone())).collect() };
    sorted.encode(&mut inner).expect("a Vec grows as needed");
    let mut out = Vec::with_capacity(inner.len() + 6);
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(inner.len() as u64, &mut out);
    out.extend_from_slice(&inner);
    out
}

/// One workload as a packed address resource. Like [`service_any`], it must depend on its
/// arguments only: the publisher reuses the previous resource of an unchanged model entry.
pub fn workload_any(w: &Workload) -> prost_types::Any {
    address_any(&xwl::Address { r#type: Some(xwl::address::Type::Workload(workload(w))) })
}

/// One service as a packed address resource.
pub fn service_any(s: &Service, network: &str) -> prost_types::Any {
    address_any(&xwl::Address { r#type: Some(xwl::address::Type::Service(service(s, network))) })
}

fn address_any(a: &xwl::Address) -> prost_types::Any {
    prost_types::Any { type_url: ztunnel_proto::ADDRESS_TYPE_URL.to_string(), value: encode_address(a) }
}

/// Translates the whole model.
pub fn translate(model: &Model) -> Resources {
    let network = &model.options.network;
    let mut addresses = BTreeMap::new();
    for (uid, w) in &model.workloads {
        addresses.insert(uid.clone(), xwl::Address { r#type: Some(xwl::address::Type::Workload(workload(w))) });
    }
    for (key, s) in &model.services {
        addresses.insert(key.clone(), xwl::Address { r#type: Some(xwl::address::Type::Service(service(s, network))) });
    }
    let authorizations = model.authorizations.iter().map(|(k, a)| (k.clone(), authorization(a))).collect();
    Resources { addresses, authorizations }
}

/// One workload.
pub fn workload(w: &Workload) -> xwl::Workload {
    xwl::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.addresses.iter().map(ip_bytes).collect(),
        network: w.network.clone(),
        tunnel_protocol: match w.tunnel_protocol {
            TunnelProtocol::None => xwl::TunnelProtocol::None,
            TunnelProtocol::Hbone => xwl::TunnelProtocol::Hbone,
        } as i32,
        trust_domain: w.trust_domain.clone(),
        service_account: w.service_account.clone(),
        waypoint: w.waypoint.as_ref().map(|a| gateway_address(a, &w.network)),
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_type: xwl::WorkloadType::Pod as i32,
        workload_name: w.workload_name.clone(),
        services: w
            .services
            .iter()
            .map(|(k, ports)| (k.clone(), xwl::PortList { ports: ports.iter().map(port).collect() }))
            .collect(),
        authorization_policies: w.authorization_policies.clone(),
        status: if w.healthy { xwl::WorkloadStatus::Healthy } else { xwl::WorkloadStatus::Unhealthy } as i32,
        cluster_id: w.cluster_id.clone(),
        locality: (w.locality != Default::default()).then(|| xwl::Locality {
            region: w.locality.region.clone(),
            zone: w.locality.zone.clone(),
            subzone: w.locality.subzone.clone(),
        }),
        network_mode: if w.host_network { xwl::NetworkMode::HostNetwork } else { xwl::NetworkMode::Standard } as i32,
        ..Default::default()
    }
}

/// One service.
pub fn service(s: &Service, network: &str) -> xwl::Service {
    use xwl::load_balancing::{HealthPolicy, Mode, Scope};
    xwl::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s.vips.iter().map(|ip| network_address(ip, network)).collect(),
        ports: s.ports.iter().map(port).collect(),
        waypoint: s.waypoint.as_ref().map(|a| gateway_address(a, network)),
        load_balancing: s.load_balancing.as_ref().map(|lb| xwl::LoadBalancing {
            routing_preference: lb
                .routing_preference
                .iter()
                .map(|s| match s {
                    LbScope::Region => Scope::Region,
                    LbScope::Zone => Scope::Zone,
                    LbScope::Subzone => Scope::Subzone,
                    LbScope::Node => Scope::Node,
                    LbScope::Network => Scope::Network,
                } as i32)
                .collect(),
            mode: match lb.mode {
                LbMode::Unspecified => Mode::UnspecifiedMode,
                LbMode::Strict => Mode::Strict,
                LbMode::Failover => Mode::Failover,
            } as i32,
            health_policy: if lb.allow_unhealthy { HealthPolicy::AllowAll } else { HealthPolicy::OnlyHealthy } as i32,
        }),
        ip_families: match s.ip_families {
            IpFamilies::Automatic => xwl::IpFamilies::Automatic,
            IpFamilies::Ipv4Only => xwl::IpFamilies::Ipv4Only,
            IpFamilies::Ipv6Only => xwl::IpFamilies::Ipv6Only,
            IpFamilies::Dual => xwl::IpFamilies::Dual,
        } as i32,
        canonical: true,
        ingress_use_waypoint: s.ingress_use_waypoint,
        ..Default::default()
    }
}

fn port(p: &PortMapping) -> xwl::Port {
    xwl::Port {
        service_port: u32::from(p.service_port),
        target_port: u32::from(p.target_port),
        app_protocol: match p.app_protocol {
            AppProtocol::Unknown => xwl::AppProtocol::Unknown,
            AppProtocol::Http11 => xwl::AppProtocol::Http11,
            AppProtocol::Http2 => xwl::AppProtocol::Http2,
            AppProtocol::Grpc => xwl::AppProtocol::Grpc,
            AppProtocol::Tcp => xwl::AppProtocol::Tcp,
            AppProtocol::Tls => xwl::AppProtocol::Tls,
        } as i32,
    }
}

fn gateway_address(a: &WaypointAddress, network: &str) -> xwl::GatewayAddress {
    use xwl::gateway_address::Destination;
    let destination = match &a.destination {
        WaypointDestination::Hostname { namespace, hostname } => {
            Destination::Hostname(xwl::NamespacedHostname { namespace: namespace.clone(), hostname: hostname.clone() })
        }
        WaypointDestination::Address(ip) => Destination::Address(network_address(ip, network)),
    };
    xwl::GatewayAddress { destination: Some(destination), hbone_mtls_port: u32::from(a.hbone_mtls_port) }
}

fn network_address(ip: &IpAddr, network: &str) -> xwl::NetworkAddress {
    xwl::NetworkAddress { network: network.to_string(), address: ip_bytes(ip), length: None }
}

/// 4 bytes for IPv4, 16 for IPv6, as istiod writes addresses.
fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// One policy.
pub fn authorization(a: &Authorization) -> xsec::Authorization {
    xsec::Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope: match a.scope {
            PolicyScope::Global => xsec::Scope::Global,
            PolicyScope::Namespace => xsec::Scope::Namespace,
            PolicyScope::WorkloadSelector => xsec::Scope::WorkloadSelector,
        } as i32,
        action: match a.action {
            PolicyAction::Allow => xsec::Action::Allow,
            PolicyAction::Deny => xsec::Action::Deny,
        } as i32,
        rules: a
            .rules
            .iter()
            .map(|rule| xsec::Rule {
                clauses: rule
                    .iter()
                    .map(|clause| xsec::Clause { matches: clause.iter().map(policy_match).collect() })
                    .collect(),
            })
            .collect(),
        dry_run: a.dry_run,
        extensions: Vec::new(),
    }
}

fn policy_match(m: &Match) -> xsec::Match {
    let strings = |v: &[StringMatch]| v.iter().map(string_match).collect();
    let cidrs = |v: &[Cidr]| {
        v.iter().map(|c| xsec::Address { address: ip_bytes(&c.addr), length: c.prefix_len.into() }).collect()
    };
    let accounts = |v: &[crate::policy::ServiceAccountMatch]| {
        v.iter()
            .map(|s| xsec::ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    let ports = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect();
    xsec::Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: cidrs(&m.source_ips),
        not_source_ips: cidrs(&m.not_source_ips),
        destination_ips: cidrs(&m.destination_ips),
        not_destination_ips: cidrs(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        extensions: Vec::new(),
    }
}

fn string_match(s: &StringMatch) -> xsec::StringMatch {
    use xsec::string_match::MatchType;
    let t = match s {
        StringMatch::Exact(v) => MatchType::Exact(v.clone()),
        StringMatch::Prefix(v) => MatchType::Prefix(v.clone()),
        StringMatch::Suffix(v) => MatchType::Suffix(v.clone()),
        StringMatch::Presence => MatchType::Presence(()),
    };
    xsec::StringMatch { match_type: Some(t) }
}
