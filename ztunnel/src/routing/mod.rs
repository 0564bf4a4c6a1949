//! The waypoint's routing engine: Istio `VirtualService` semantics as a pure function of
//! config and request, with no I/O, so every rule can be tested as a table of cases.
//!
//! - [`spec`]: the `networking.istio.io` (v1, v1beta1, v1alpha3) VirtualService shape;
//! - [`objects`]: VirtualServices and DestinationRules (v1, v1beta1, v1alpha3) read from
//!   YAML, each compiled or rejected on its own;
//! - [`compile`]: validation as Istio does it (each invalid object rejected with its name
//!   and reason) into matchers ready to run;
//! - [`Router`]: a request in, a [`Decision`] out. The first matching rule wins; conditions
//!   AND within a match block and OR across blocks; a rule without match catches all.
mod compile;
pub mod gateway_api;
pub mod ingress;
mod matching;
pub mod objects;
pub mod spec;
#[cfg(test)]
mod tests;
pub mod traffic_policy;

pub use compile::{compile, duration, CompiledRoute, Cors, Invalid, Retries, Router, DEFAULT_RETRY_ON};
pub use matching::{Decision, Request, WeightedTarget};
