//! The control plane (`ztunnel controller`): turns Kubernetes-style objects into the xDS
//! resources node proxies consume and serves them, together with the CA, over one TLS gRPC
//! listener (DESIGN §5, §6).

pub mod ads;
pub mod ca;
pub mod grpc;
