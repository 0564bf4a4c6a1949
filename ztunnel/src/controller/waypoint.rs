//! Which waypoint (L7 proxy) a service or workload uses, with Istio's rules (`waypoints.go`):
//!
//! - the `istio.io/use-waypoint` label names the waypoint (`none` opts out); `istio.io/use-waypoint-namespace`
//!   names its namespace when it is not the object's own. The object's label wins over its namespace's label;
//!   a service's label applies to the service (traffic to its VIP), a pod's label to the workload (traffic to its
//!   IP), as in Istio.
//! - a waypoint is a `gateway.networking.k8s.io` Gateway of class `istio-waypoint`; its address is the hostname
//!   (or IP) in `status.addresses`, or `<name>.<ns>.svc.<domain>` when no gateway controller filled the status in
//!   (the Service istiod's deployment controller would create). As an extension for plain YAML, a Service of that
//!   name is accepted as the waypoint when there is no such Gateway.
//! - `istio.io/waypoint-for` on the waypoint says which traffic it takes: `service` (the default), `workload`,
//!   `all` or `none`. A namespace label only binds the traffic types the waypoint takes; an object's own label that
//!   names a waypoint not taking its traffic type is reported.
//! - attachment from another namespace needs the Gateway's HBONE listener to allow routes from it
//!   (`allowedRoutes.namespaces.from: All` or `Selector`); a Service waypoint only serves its own namespace.
//! - a waypoint's own pods and Service never get a waypoint.
use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_yaml_ng::Value;

use super::objects::{api_group, RawObject, StringMap};

/// The label naming the waypoint.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// The label naming the waypoint's namespace, when it differs.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// The label on a waypoint saying which traffic it takes.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// The Gateway class of Istio's waypoints.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";
/// The label Gateway API puts on a gateway's pods.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The label istiod puts on the Service of a waypoint it deploys.
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
/// Its value for waypoints.
pub const MANAGED_WAYPOINT: &str = "istio.io-mesh-controller";
/// The port waypoints accept HBONE on.
pub const HBONE_PORT: u16 = 15008;

/// How a waypoint is reached (Istio's `GatewayAddress`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointAddress {
    pub destination: WaypointDestination,
    pub hbone_mtls_port: u16,
}

/// A hostname (resolved through the waypoint's Service) or a fixed IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaypointDestination {
    Hostname { namespace: String, hostname: String },
    Address(IpAddr),
}

/// Which traffic a waypoint takes (`istio.io/waypoint-for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficType {
    Service,
    Workload,
    All,
    None,
}

impl TrafficType {
    fn parse(v: Option<&String>) -> Self {
        match v.map(String::as_str) {
            None | Some("service") => TrafficType::Service,
            Some("workload") => TrafficType::Workload,
            Some("all") => TrafficType::All,
            Some(_) => TrafficType::None,
        }
    }

    /// Whether service (VIP) traffic goes through it.
    pub fn services(self) -> bool {
        matches!(self, TrafficType::Service | TrafficType::All)
    }

    /// Whether workload (pod IP) traffic goes through it.
    pub fn workloads(self) -> bool {
        matches!(self, TrafficType::Workload | TrafficType::All)
    }
}

/// Which namespaces may use a waypoint.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attachment {
    Same,
    All,
    Selector(StringMap),
}

/// A waypoint services and workloads can be bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    pub address: WaypointAddress,
    pub traffic_type: TrafficType,
    attachment: Attachment,
}

impl Waypoint {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn allows(&self, namespace: &str, namespace_labels: &StringMap) -> bool {
        match &self.attachment {
            Attachment::Same => self.namespace == namespace,
            Attachment::All => true,
            Attachment::Selector(sel) => sel.iter().all(|(k, v)| namespace_labels.get(k) == Some(v)),
        }
    }
}

/// Whether a raw object is a waypoint Gateway.
pub fn is_waypoint_gateway(o: &RawObject) -> bool {
    o.kind == "Gateway"
        && api_group(&o.api_version) == "gateway.networking.k8s.io"
        && o.spec.get("gatewayClassName").and_then(Value::as_str) == Some(WAYPOINT_GATEWAY_CLASS)
}

/// Reads a waypoint Gateway (see [`is_waypoint_gateway`]).
pub fn from_gateway(o: &RawObject, namespace: &str, domain_suffix: &str) -> Waypoint {
    let addresses = o.status.get("addresses").and_then(Value::as_sequence).map(Vec::as_slice).unwrap_or_default();
    let typed = |want: &str| {
        addresses.iter().find_map(|a| {
            let kind = a.get("type").and_then(Value::as_str).unwrap_or("IPAddress");
            let value = a.get("value").and_then(Value::as_str)?;
            (kind == want).then(|| value.to_string())
        })
    };
    let destination = if let Some(hostname) = typed("Hostname") {
        WaypointDestination::Hostname { namespace: namespace.into(), hostname }
    } else if let Some(ip) = typed("IPAddress").and_then(|v| v.parse().ok()) {
        WaypointDestination::Address(ip)
    } else {
        let hostname = format!("{}.{namespace}.svc.{domain_suffix}", o.metadata.name);
        WaypointDestination::Hostname { namespace: namespace.into(), hostname }
    };
    Waypoint {
        namespace: namespace.into(),
        name: o.metadata.name.clone(),
        address: WaypointAddress { destination, hbone_mtls_port: HBONE_PORT },
        traffic_type: TrafficType::parse(o.metadata.labels.get(WAYPOINT_FOR_LABEL)),
        attachment: gateway_attachment(&o.spec),
    }
}

/// `allowedRoutes.namespaces` of the HBONE listener (else the first listener); `Same` by default.
fn gateway_attachment(spec: &Value) -> Attachment {
    let listeners = spec.get("listeners").and_then(Value::as_sequence).map(Vec::as_slice).unwrap_or_default();
    let listener = listeners
        .iter()
        .find(|l| l.get("protocol").and_then(Value::as_str) == Some("HBONE"))
        .or_else(|| listeners.first());
    let namespaces = listener.and_then(|l| l.get("allowedRoutes")).and_then(|a| a.get("namespaces"));
    match namespaces.and_then(|n| n.get("from")).and_then(Value::as_str) {
        Some("All") => Attachment::All,
        Some("Selector") => {
            let labels = namespaces
                .and_then(|n| n.get("selector"))
                .and_then(|s| s.get("matchLabels"))
                .and_then(|m| serde_yaml_ng::from_value::<StringMap>(m.clone()).ok())
                .unwrap_or_default();
            Attachment::Selector(labels)
        }
        _ => Attachment::Same,
    }
}

/// A Service used as a waypoint (our extension): reached by its hostname, same-namespace only.
pub fn from_service(namespace: &str, name: &str, hostname: &str, labels: &StringMap) -> Waypoint {
    Waypoint {
        namespace: namespace.into(),
        name: name.into(),
        address: WaypointAddress {
            destination: WaypointDestination::Hostname { namespace: namespace.into(), hostname: hostname.into() },
            hbone_mtls_port: HBONE_PORT,
        },
        traffic_type: TrafficType::parse(labels.get(WAYPOINT_FOR_LABEL)),
        attachment: Attachment::Same,
    }
}

/// A `use-waypoint` label: opted out, or the waypoint it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UseWaypoint {
    None,
    Named { namespace: String, name: String },
}

/// Reads the `use-waypoint` labels of an object in `namespace`.
pub fn use_waypoint(labels: &StringMap, namespace: &str) -> Option<UseWaypoint> {
    let name = labels.get(USE_WAYPOINT_LABEL)?;
    if name == "none" {
        return Some(UseWaypoint::None);
    }
    let namespace = labels.get(USE_WAYPOINT_NAMESPACE_LABEL).map(String::as_str).unwrap_or(namespace);
    Some(UseWaypoint::Named { namespace: namespace.into(), name: name.clone() })
}

/// All known waypoints, by `namespace/name`.
#[derive(Debug, Clone, Default)]
pub struct Waypoints {
    pub by_key: BTreeMap<String, Waypoint>,
}

/// The result of looking up the waypoint for an object: the waypoint, nothing, or nothing plus why (for status).
pub type Resolution<'a> = Result<Option<&'a Waypoint>, String>;

impl Waypoints {
    fn lookup(&self, namespace: &str, name: &str, from_namespace: &str, ns_labels: &StringMap) -> Resolution<'_> {
        match self.by_key.get(&format!("{namespace}/{name}")) {
            None => Err(format!("waypoint {namespace}/{name} not found (no istio-waypoint Gateway or Service)")),
            Some(w) if !w.allows(from_namespace, ns_labels) => {
                Err(format!("waypoint {} does not allow attachment from namespace {from_namespace}", w.key()))
            }
            Some(w) => Ok(Some(w)),
        }
    }

    /// Istio's `fetchWaypointForTarget`: the object's own label, else its namespace's. The flag says whether the
    /// object's own label decided.
    fn for_target(&self, labels: &StringMap, namespace: &str, ns_labels: &StringMap) -> (Resolution<'_>, bool) {
        match use_waypoint(labels, namespace) {
            Some(UseWaypoint::None) => (Ok(None), true),
            Some(UseWaypoint::Named { namespace: wns, name }) => (self.lookup(&wns, &name, namespace, ns_labels), true),
            None => match use_waypoint(ns_labels, namespace) {
                Some(UseWaypoint::Named { namespace: wns, name }) => {
                    (self.lookup(&wns, &name, namespace, ns_labels), false)
                }
                _ => (Ok(None), false),
            },
        }
    }

    /// The waypoint of a service (traffic to its VIPs). `is_waypoint`: the service belongs to a waypoint itself.
    pub fn for_service(
        &self,
        labels: &StringMap,
        namespace: &str,
        ns_labels: &StringMap,
        is_waypoint: bool,
    ) -> Resolution<'_> {
        if is_waypoint || labels.get(MANAGED_LABEL).map(String::as_str) == Some(MANAGED_WAYPOINT) {
            return Ok(None);
        }
        match self.for_target(labels, namespace, ns_labels).0? {
            Some(w) if !w.traffic_type.services() => {
                Err(format!("waypoint {} does not take service traffic ({WAYPOINT_FOR_LABEL})", w.key()))
            }
            other => Ok(other),
        }
    }

    /// The waypoint of a workload (traffic to its IPs). `is_instance`: the pod is one of a waypoint's own pods.
    /// Errors are only reported when the pod's own label asked for the waypoint (a namespace-wide waypoint that
    /// does not take workload traffic simply does not apply).
    pub fn for_workload(
        &self,
        labels: &StringMap,
        namespace: &str,
        ns_labels: &StringMap,
        is_instance: bool,
    ) -> Resolution<'_> {
        if is_instance {
            return Ok(None);
        }
        let (found, own_label) = self.for_target(labels, namespace, ns_labels);
        match found {
            Ok(Some(w)) if !w.traffic_type.workloads() => {
                if own_label {
                    Err(format!("waypoint {} does not take workload traffic ({WAYPOINT_FOR_LABEL})", w.key()))
                } else {
                    Ok(None)
                }
            }
            Err(_) if !own_label => Ok(None),
            other => other,
        }
    }
}
