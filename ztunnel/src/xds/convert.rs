//! Istio's xDS resources (`istio.workload.Address`, `istio.security.Authorization`) turned
//! into the state store's and the policy engine's own types. Pure: bytes in, values or a
//! reason out, so every rejection names the resource and says why (for the NACK).
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ztunnel_proto::security as pb_sec;
use ztunnel_proto::workload as pb;

use crate::policy::{Authorization, Cidr, Match, PolicyAction, PolicyScope, Rule, ServiceAccountMatch, StringMatch};
use crate::state::{Locality, Service, WaypointRef, Workload, WorkloadProtocol};

/// One `Address` resource: a workload or a service.
#[derive(Debug, Clone, PartialEq)]
pub enum AddressResource {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
}

/// Decodes and converts an `Address` resource's bytes.
pub fn address(bytes: &[u8]) -> Result<AddressResource, String> {
    let a: pb::Address = prost::Message::decode(bytes).map_err(|e| format!("not an istio.workload.Address: {e}"))?;
    match a.r#type {
        Some(pb::address::Type::Workload(w)) => workload(w).map(|w| AddressResource::Workload(Arc::new(w))),
        Some(pb::address::Type::Service(s)) => service(s).map(|s| AddressResource::Service(Arc::new(s))),
        None => Err("Address has neither a workload nor a service".into()),
    }
}

/// Decodes and converts an `Authorization` resource's bytes.
pub fn authorization(bytes: &[u8]) -> Result<Authorization, String> {
    let a: pb_sec::Authorization =
        prost::Message::decode(bytes).map_err(|e| format!("not an istio.security.Authorization: {e}"))?;
    policy(a)
}

fn ip(bytes: &[u8]) -> Result<IpAddr, String> {
    match bytes.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(bytes).expect("length checked"))),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(bytes).expect("length checked"))),
        n => Err(format!("address of {n} bytes is neither IPv4 nor IPv6")),
    }
}

fn port(p: u32) -> Result<u16, String> {
    u16::try_from(p).map_err(|_| format!("port {p} is out of range"))
}

fn ports(list: &[pb::Port]) -> Result<BTreeMap<u16, u16>, String> {
    list.iter().map(|p| Ok((port(p.service_port)?, port(p.target_port)?))).collect()
}

/// Istio's workload type as the lower-case kind used in baggage (`k8s.<kind>.name`).
fn workload_type(t: i32) -> &'static str {
    match pb::WorkloadType::try_from(t) {
        Ok(pb::WorkloadType::Cronjob) => "cronjob",
        Ok(pb::WorkloadType::Pod) => "pod",
        Ok(pb::WorkloadType::Job) => "job",
        _ => "deployment",
    }
}

fn workload(w: pb::Workload) -> Result<Workload, String> {
    if w.uid.is_empty() {
        return Err("workload has no uid".into());
    }
    let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pb::TunnelProtocol::None) => WorkloadProtocol::Tcp,
        Ok(pb::TunnelProtocol::Hbone) => WorkloadProtocol::Hbone,
        other => return Err(format!("tunnel protocol {other:?} is not supported")),
    };
    let workload_ips = w.addresses.iter().map(|a| ip(a)).collect::<Result<Vec<_>, _>>()?;
    let services = w
        .services
        .iter()
        .map(|(k, v)| Ok((k.clone(), ports(&v.ports).map_err(|e| format!("service {k}: {e}"))?)))
        .collect::<Result<BTreeMap<_, _>, String>>()?;
    Ok(Workload {
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        service_account: if w.service_account.is_empty() { "default".into() } else { w.service_account },
        workload_ips,
        protocol,
        node: w.node,
        trust_domain: w.trust_domain,
        services,
        authorization_policies: w.authorization_policies,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        cluster_id: w.cluster_id,
        workload_name: w.workload_name,
        workload_type: workload_type(w.workload_type).into(),
        labels: Default::default(),
        locality: w
            .locality
            .map(|l| Locality { region: l.region, zone: l.zone, subzone: l.subzone })
            .unwrap_or_default(),
    })
}

fn service(s: pb::Service) -> Result<Service, String> {
    if s.hostname.is_empty() {
        return Err("service has no hostname".into());
    }
    let vips = s
        .addresses
        .iter()
        .map(|a| {
            let addr = ip(&a.address)?;
            Ok(if a.network.is_empty() { addr.to_string() } else { format!("{}/{addr}", a.network) })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        ports: ports(&s.ports)?,
        subject_alt_names: s.subject_alt_names,
        waypoint: s.waypoint.as_ref().map(waypoint).transpose()?,
    })
}

/// A service's waypoint: an address, or the namespaced hostname of the waypoint's Service.
fn waypoint(g: &pb::GatewayAddress) -> Result<WaypointRef, String> {
    use pb::gateway_address::Destination;
    let port = u16::try_from(g.hbone_mtls_port).ok().filter(|p| *p > 0).ok_or("waypoint hboneMtlsPort")?;
    match &g.destination {
        Some(Destination::Address(a)) => {
            Ok(WaypointRef { address: Some(ip(&a.address)?), hostname: None, hbone_mtls_port: port })
        }
        Some(Destination::Hostname(h)) => Ok(WaypointRef {
            address: None,
            hostname: Some(format!("{}/{}", h.namespace, h.hostname)),
            hbone_mtls_port: port,
        }),
        None => Err("waypoint without a destination".into()),
    }
}

fn string_match(m: &pb_sec::StringMatch) -> Result<StringMatch, String> {
    use pb_sec::string_match::MatchType;
    match &m.match_type {
        Some(MatchType::Exact(v)) => Ok(StringMatch::Exact(v.clone())),
        Some(MatchType::Prefix(v)) => Ok(StringMatch::Prefix(v.clone())),
        Some(MatchType::Suffix(v)) => Ok(StringMatch::Suffix(v.clone())),
        Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
        None => Err("string match without a value".into()),
    }
}

fn cidr(a: &pb_sec::Address) -> Result<Cidr, String> {
    let addr = ip(&a.address)?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_len =
        u8::try_from(a.length).ok().filter(|l| *l <= max).ok_or(format!("prefix /{} on {addr}", a.length))?;
    Ok(Cidr { addr, prefix_len })
}

fn matches(m: &pb_sec::Match) -> Result<Match, String> {
    let strings = |v: &[pb_sec::StringMatch]| v.iter().map(string_match).collect::<Result<Vec<_>, _>>();
    let cidrs = |v: &[pb_sec::Address]| v.iter().map(cidr).collect::<Result<Vec<_>, _>>();
    let ports = |v: &[u32]| v.iter().map(|p| port(*p)).collect::<Result<Vec<_>, _>>();
    let sas = |v: &[pb_sec::ServiceAccountMatch]| {
        v.iter()
            .map(|s| ServiceAccountMatch { namespace: s.namespace.clone(), service_account: s.service_account.clone() })
            .collect()
    };
    if !m.extensions.is_empty() {
        return Err("match extensions are not supported".into());
    }
    Ok(Match {
        namespaces: strings(&m.namespaces)?,
        not_namespaces: strings(&m.not_namespaces)?,
        principals: strings(&m.principals)?,
        not_principals: strings(&m.not_principals)?,
        service_accounts: sas(&m.service_accounts),
        not_service_accounts: sas(&m.not_service_accounts),
        source_ips: cidrs(&m.source_ips)?,
        not_source_ips: cidrs(&m.not_source_ips)?,
        destination_ips: cidrs(&m.destination_ips)?,
        not_destination_ips: cidrs(&m.not_destination_ips)?,
        destination_ports: ports(&m.destination_ports)?,
        not_destination_ports: ports(&m.not_destination_ports)?,
    })
}

fn policy(a: pb_sec::Authorization) -> Result<Authorization, String> {
    if a.name.is_empty() {
        return Err("authorization has no name".into());
    }
    let scope = match pb_sec::Scope::try_from(a.scope) {
        Ok(pb_sec::Scope::Global) => PolicyScope::Global,
        Ok(pb_sec::Scope::Namespace) => PolicyScope::Namespace,
        Ok(pb_sec::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
        Err(_) => return Err(format!("unknown scope {}", a.scope)),
    };
    let action = match pb_sec::Action::try_from(a.action) {
        Ok(pb_sec::Action::Allow) => PolicyAction::Allow,
        Ok(pb_sec::Action::Deny) => PolicyAction::Deny,
        Err(_) => return Err(format!("unknown action {}", a.action)),
    };
    // An extension the engine does not understand could narrow a DENY or widen an ALLOW:
    // refuse the policy rather than guess.
    if !a.extensions.is_empty() {
        return Err("policy extensions are not supported".into());
    }
    let clause = |c: &pb_sec::Clause| c.matches.iter().map(matches).collect::<Result<Vec<Match>, String>>();
    let rule = |r: &pb_sec::Rule| r.clauses.iter().map(clause).collect::<Result<Rule, String>>();
    let rules = a.rules.iter().map(rule).collect::<Result<Vec<Rule>, String>>()?;
    Ok(Authorization { name: a.name, namespace: a.namespace, scope, action, rules, dry_run: a.dry_run })
}
