//! The node proxy, waypoint and control plane of an eBPF-accelerated ambient mesh.
//!
//! Dependencies flow one way: `redirect` (kernel programs, shared types) and `netns` at the
//! bottom; `identity`/`tls` beside them; then `hbone` and `proxy`; `node` wires them together.
pub mod admin;
pub mod cni;
pub mod controller;
pub mod ctl;
pub mod enrollment;
pub mod gateway;
pub mod grpc;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod node;
pub mod policy;
pub mod process;
pub mod proxy;
pub mod redirect;
pub mod routing;
pub mod spans;
pub mod state;
pub mod task;
pub mod tls;
pub mod waypoint;
pub mod xds;
