//! The node proxy, waypoint and control plane of an eBPF-accelerated ambient mesh.
//!
//! Dependencies flow one way: `redirect` (kernel programs, shared types) and `netns` at the
//! bottom; `identity`/`tls` beside them; then `hbone` and `proxy`; `node` wires them together.
pub mod enrollment;
pub mod hbone;
pub mod netns;
pub mod node;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod state;
pub mod identity;
pub mod tls;
pub mod admin;
pub mod metrics;
