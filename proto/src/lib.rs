//! Generated protobuf types and gRPC services, wire-compatible with Istio's ztunnel and istiod.
//!
//! The module tree mirrors the proto package hierarchy (`istio::workload`, `envoy::service::
//! discovery::v3`, ...) because generated code refers to other packages through relative
//! `super::` paths. Short aliases (`workload`, `security`, `discovery`, `ca`, `zds`) are
//! re-exported at the crate root. Google well-known types come from `prost_types`.

/// Istio's own packages.
pub mod istio {
    /// `istio.workload`: WDS resources (Address = Workload | Service) pushed by istiod over delta xDS.
    #[allow(clippy::all)]
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));

        /// `istio.workload.zds`: pod enrollment between the CNI agent and the node agent over a unix socket.
        #[allow(clippy::all)]
        pub mod zds {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
        }
    }

    /// `istio.security`: L4 authorization policies pushed by istiod over delta xDS.
    #[allow(clippy::all)]
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }

    /// `istio.v1`: only holds the CA package.
    pub mod v1 {
        /// `istio.v1.auth`: Istio CA certificate signing (`IstioCertificateService`).
        #[allow(clippy::all)]
        pub mod auth {
            include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        }
    }
}

/// Envoy's xDS packages (only what the discovery protocol needs).
pub mod envoy {
    /// `envoy.config`: only holds `core`.
    pub mod config {
        /// `envoy.config.core`: only holds `v3`.
        pub mod core {
            /// `envoy.config.core.v3`: Node, Locality, ControlPlane, Metadata referenced by discovery messages.
            #[allow(clippy::all)]
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.config.core.v3.rs"));
            }
        }
    }

    /// `envoy.service`: only holds `discovery`.
    pub mod service {
        /// `envoy.service.discovery`: only holds `v3`.
        pub mod discovery {
            /// `envoy.service.discovery.v3`: (Delta)DiscoveryRequest/Response and the ADS gRPC service.
            #[allow(clippy::all)]
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
            }
        }
    }
}

/// Google packages that are not well-known types.
pub mod google {
    /// `google.rpc`: the Status carried in xDS NACKs (`error_detail`).
    #[allow(clippy::all)]
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

pub use envoy::service::discovery::v3 as discovery;
pub use istio::security;
pub use istio::v1::auth as ca;
pub use istio::workload;
pub use istio::workload::zds;

/// `type_url` of WDS address resources (`istio.workload.Address`) on the delta xDS stream.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// `type_url` of authorization policy resources (`istio.security.Authorization`).
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
