//! The controller's `/config_dump`: what it serves, read back the way a node agent reads it
//! (each resource encoded as sent over xDS, then decoded by the agent's own converter), in
//! the layout `ztunnel ctl` reads from agents. So `ztunnel ctl --admin <controller>`
//! shows the workloads, services and policies the mesh is being given, before any agent
//! has them, and a resource the agents would reject shows up as such here too.
use serde_json::{json, Value};

use super::model::Model;
use super::translate::{encode_address, translate};
use crate::xds::convert::{self, AddressResource};

/// The dump of `model`.
pub fn config_dump(model: &Model, route_conditions: Value) -> Value {
    let resources = translate(model);
    let (mut workloads, mut services, mut rejected) = (Vec::new(), Vec::new(), Vec::new());
    for (name, a) in &resources.addresses {
        match convert::address(&encode_address(a)) {
            Ok(AddressResource::Workload(w)) => workloads.push(w),
            Ok(AddressResource::Service(s)) => services.push(s),
            Err(reason) => rejected.push(json!({"name": name, "reason": reason})),
        }
    }
    let mut policies = Vec::new();
    for (name, a) in &resources.authorizations {
        use prost::Message;
        match convert::authorization(&a.encode_to_vec()) {
            Ok(p) => policies.push(p),
            Err(reason) => rejected.push(json!({"name": name, "reason": reason})),
        }
    }
    json!({
        "dumpVersion": crate::ctl::DUMP_VERSION,
        "version": env!("CARGO_PKG_VERSION"),
        "role": "controller",
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "invalidPolicies": rejected,
        "routeConditions": route_conditions,
    })
}
