//! The node's view of the mesh: workloads, services and authorization policies, indexed
//! for the data path (who is at this IP? which endpoints back this VIP?). Loaded from
//! Istio's local-config YAML shape (`{workloads, services, policies}`) for now; xDS later
//! feeds the same store. Updates replace the whole snapshot atomically; a bad entry is
//! rejected by name (a bad policy also fails closed for the workloads it could select), and
//! a document that is not YAML at all leaves the last snapshot in force.
mod config;
mod file;
mod store;

pub use config::{
    parse_local_config, ConfigError, LocalConfig, Locality, Service, WaypointRef, Workload, WorkloadProtocol,
};
pub use file::{follow_local_config, load_local_config};
pub use store::{PodMatch, Scope, Snapshot, StateStore, Upstream};
