//! A Kubernetes Service's own fields as the model keeps them, with istiod's rules (`constructService`): VIPs from
//! `clusterIP(s)` (`None` and empty give none), ports with numeric target ports (a named target port is 0 here and
//! resolved per workload against its container ports), the application protocol from `appProtocol` or the port
//! name prefix, IP families, and load-balancing preferences from the internal traffic policy, the traffic
//! distribution (field, then Istio's annotation on the service, then on its namespace) and
//! `publishNotReadyAddresses`. Waypoints and membership are decided by the model, which knows the other objects.
use std::net::IpAddr;

use super::model::{AppProtocol, IpFamilies, LbMode, LbScope, LoadBalancing, Options, PortMapping, Service};
use super::objects::{self, IntOrString, ObjectMeta, StringMap};

const TRAFFIC_DISTRIBUTION_ANNOTATION: &str = "networking.istio.io/traffic-distribution";

/// A service being built, with what joining workloads needs.
pub(super) struct ServiceBuild {
    /// Index of the Service object in the build's snapshot: workloads remember which objects selected them.
    pub source: usize,
    pub service: Service,
    pub selector: StringMap,
    /// Per port: the target port name, when it is named.
    pub named_targets: Vec<Option<String>>,
}

/// Reads a Service's own fields (no waypoint or load balancing yet); `source` is its object's index.
pub(super) fn service(svc: &objects::Service, ns: &str, o: &Options, source: usize) -> Result<ServiceBuild, String> {
    let spec = &svc.spec;
    match spec.kind.as_deref() {
        None | Some("ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName") => {}
        Some(other) => return Err(format!("spec.type: unknown type {other:?}")),
    }
    let mut listed: Vec<&str> = spec.cluster_ips.iter().map(String::as_str).collect();
    if listed.is_empty() {
        listed.extend(spec.cluster_ip.as_deref());
    }
    let mut vips = Vec::new();
    for ip in listed.into_iter().filter(|ip| !ip.is_empty() && *ip != "None") {
        vips.push(ip.parse::<IpAddr>().map_err(|_| format!("spec.clusterIPs: invalid IP {ip:?}"))?);
    }
    let mut ports = Vec::new();
    let mut named_targets = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        if p.port == 0 {
            return Err(format!("spec.ports[{i}].port: must be 1-65535"));
        }
        if let Some(proto) = p.protocol.as_deref().filter(|p| !matches!(*p, "TCP" | "UDP" | "SCTP")) {
            return Err(format!("spec.ports[{i}].protocol: unknown protocol {proto:?}"));
        }
        let (target, named) = match &p.target_port {
            None => (p.port, None),
            Some(IntOrString::Int(n)) => match u16::try_from(*n) {
                Ok(t) if t != 0 => (t, None),
                _ => return Err(format!("spec.ports[{i}].targetPort: must be 1-65535, found {n}")),
            },
            Some(IntOrString::String(s)) => match s.parse::<u16>() {
                Ok(t) if t != 0 => (t, None),
                _ if !s.is_empty() && s.parse::<i64>().is_err() => (0, Some(s.clone())),
                _ => return Err(format!("spec.ports[{i}].targetPort: invalid port {s:?}")),
            },
        };
        let app_protocol =
            app_protocol(p.port, p.name.as_deref().unwrap_or(""), p.protocol.as_deref(), p.app_protocol.as_deref());
        ports.push(PortMapping { service_port: p.port, target_port: target, app_protocol });
        named_targets.push(named);
    }
    let ip_families = match spec.ip_families.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] => IpFamilies::Automatic,
        [_, _] => IpFamilies::Dual,
        ["IPv4"] => IpFamilies::Ipv4Only,
        ["IPv6"] => IpFamilies::Ipv6Only,
        other => return Err(format!("spec.ipFamilies: invalid {other:?} (IPv4 and/or IPv6)")),
    };
    let service = Service {
        name: svc.metadata.name.clone(),
        namespace: ns.to_string(),
        hostname: format!("{}.{ns}.svc.{}", svc.metadata.name, o.domain_suffix),
        vips,
        ports,
        waypoint: None,
        ingress_use_waypoint: false,
        ip_families,
        load_balancing: None,
    };
    Ok(ServiceBuild { source, service, selector: spec.selector.clone(), named_targets })
}

/// Istio's `constructService` load-balancing rules.
pub(super) fn load_balancing(svc: &objects::Service, ns: &ObjectMeta) -> Option<LoadBalancing> {
    use LbScope::*;
    let spec = &svc.spec;
    let mut lb = if spec.internal_traffic_policy.as_deref() == Some("Local") {
        Some(LoadBalancing { routing_preference: vec![Node], mode: LbMode::Strict, allow_unhealthy: false })
    } else {
        let annotation = |m: &ObjectMeta| m.annotations.get(TRAFFIC_DISTRIBUTION_ANNOTATION).map(|v| v.to_lowercase());
        let from_spec = match spec.traffic_distribution.as_deref() {
            Some("PreferClose" | "PreferSameZone") => Some("preferclose".to_string()),
            Some("PreferSameNode") => Some("prefersamenode".to_string()),
            _ => None,
        };
        let td = from_spec.or_else(|| annotation(&svc.metadata)).or_else(|| annotation(ns));
        match td.as_deref() {
            Some("preferclose" | "prefersamezone") => Some(LoadBalancing {
                routing_preference: vec![Network, Region, Zone],
                mode: LbMode::Failover,
                allow_unhealthy: false,
            }),
            Some("prefersamenode") => Some(LoadBalancing {
                routing_preference: vec![Network, Region, Zone, Subzone, Node],
                mode: LbMode::Failover,
                allow_unhealthy: false,
            }),
            _ => None,
        }
    };
    if spec.publish_not_ready_addresses {
        lb.get_or_insert(LoadBalancing {
            routing_preference: vec![],
            mode: LbMode::Unspecified,
            allow_unhealthy: false,
        })
        .allow_unhealthy = true;
    }
    lb
}

/// Istio's `ConvertProtocol` → `AppProtocol`.
fn app_protocol(port: u16, name: &str, protocol: Option<&str>, app_protocol: Option<&str>) -> AppProtocol {
    if protocol == Some("UDP") {
        return AppProtocol::Unknown;
    }
    let mut name = name.to_string();
    if let Some(ap) = app_protocol {
        match ap {
            "kubernetes.io/h2c" => return AppProtocol::Http2,
            "kubernetes.io/ws" => return AppProtocol::Http11,
            "kubernetes.io/wss" => return AppProtocol::Tls,
            _ => name = ap.to_string(),
        }
    }
    let lower = name.to_lowercase();
    if lower.starts_with("grpc-web") {
        return AppProtocol::Unknown; // gRPC-Web has no AppProtocol value
    }
    match lower.split('-').next().unwrap_or_default() {
        "http" => AppProtocol::Http11,
        "http2" => AppProtocol::Http2,
        "grpc" => AppProtocol::Grpc,
        "https" | "tls" => AppProtocol::Tls,
        "tcp" => AppProtocol::Tcp,
        "" | "http_proxy" | "mongo" | "redis" | "mysql" | "udp" => AppProtocol::Unknown,
        _ if matches!(port, 25 | 53 | 3306 | 27017) => AppProtocol::Tcp,
        _ => AppProtocol::Unknown,
    }
}
