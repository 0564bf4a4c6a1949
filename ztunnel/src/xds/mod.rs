//! The node agent's side of Istio's control-plane API: a delta ADS client that keeps the
//! state store in step with the server (`client`), and the pure conversion of Istio's
//! resources into the store's and policy engine's types (`convert`). The proxies only read
//! state snapshots and never call into this module.
pub mod client;
pub mod convert;

pub use client::{run, XdsConfig, XdsError, XdsStats};

#[cfg(test)]
mod tests;
