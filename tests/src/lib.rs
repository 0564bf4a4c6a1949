//! Mini-cluster test harness: nodes and pods as network namespaces (plus pod
//! cgroups), wired like a small Kubernetes cluster, for end-to-end tests of
//! the mesh. Parallel-safe: every cluster has a unique name prefix and the
//! calling thread's namespaces are never changed.
//!
//! Requires root, iproute2 at `/usr/sbin/ip` and a mounted cgroup2 hierarchy.

pub mod cgroup;
pub mod cluster;
pub mod cmd;
pub mod netns;
pub mod sweep;

pub use cgroup::cgroup2_root;
pub use cluster::{listening_sockets, Cluster, InNetns, Node, Pod};
pub use netns::{in_netns, spawn_in_netns};
pub use sweep::sweep_leftovers;
pub mod agent_process;
pub mod ambient;
pub mod apps;
pub mod benchkit;
pub mod bookinfo;
pub mod bookinfo_l7;
pub mod cni;
pub mod control_plane;
pub mod foreign_lb;
pub mod forward;
pub mod grpc_app;
pub mod istio;
pub mod loadgen;
pub mod mesh;
pub mod observability;
pub mod otlp;
pub mod prometheus;
pub mod side_by_side;
pub mod waypoint;
pub mod waypoint_bench;
pub mod wire;
pub mod xds_scale;
