//! The control plane (`ztunnel controller`): turns Kubernetes-style objects into the xDS
//! resources node proxies consume and serves them, together with the CA, over one TLS gRPC
//! listener (DESIGN §5, §6).
//!
//! The translation core turns a directory of Kubernetes YAML (Namespaces, Pods, Deployments, Services,
//! ServiceAccounts, AuthorizationPolicies, PeerAuthentications, and routing objects carried for the waypoint)
//! into `istio.workload.Address` and `istio.security.Authorization` resources with istiod's ambient semantics, so
//! any Istio ztunnel, or ours, sees what istiod would send it. The flow is one way and only the first step does
//! I/O: [`source`] (files → objects, plus what could not be read) → [`model`] (objects → workloads, services,
//! policies, waypoints; every object's status) → [`translate`] (model → named xDS resources).
//!
//! The objects may instead come from a live API server (cargo feature `kube`, `ztunnel controller --kubernetes`):
//! `kube` lists and watches the same kinds, and [`watched`] turns what it receives into the same snapshot through
//! the same parser ([`source::parse_json_object`]), so the model, status and translation are shared. That path has
//! not run against a real cluster.
//!
//! The translation never uses the proxy, the capture, HBONE or the node agent: it speaks to the data plane only
//! through the protos. Each rule, and where it differs from Istio, is documented in its module: [`model`]
//! (ambient enrolment, workloads, status), [`services`] (ports, protocols, load balancing), [`pods`] (Deployments
//! and this project's `mesh.local/pod-ips` / `mesh.local/nodes` annotations), [`waypoint`]
//! (`istio.io/use-waypoint`), [`authz`] (AuthorizationPolicy and PeerAuthentication).

pub mod ads;
pub mod authz;
pub mod ca;
pub mod dir_events;
pub mod dump;
pub mod gateway_routes;
pub mod grpc;
#[cfg(feature = "kube")]
pub mod kube;
pub mod model;
pub mod objects;
pub mod pods;
mod reuse;
pub mod runtime;
mod selectors;
pub mod services;
pub mod source;
pub mod status;
pub mod translate;
pub mod watched;
pub mod waypoint;

use std::io;
use std::path::Path;

pub use gateway_routes::RouteConditions;
pub use model::{Model, Options};
pub use runtime::{Controller, ControllerConfig, ControllerError, Source};
pub use source::fingerprint;
pub use status::{Origin, Outcome, StatusEntry};
pub use translate::{translate, Resources};

/// Reads `dir` (a directory of YAML, or one file) and builds the model. Fails only when `dir` cannot be read at
/// all; every problem inside it is in [`Model::status`].
pub fn load(dir: &Path, options: Options) -> io::Result<Model> {
    Ok(Model::build(source::read_dir(dir)?, options))
}

#[cfg(test)]
mod tests;
