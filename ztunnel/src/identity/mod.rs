//! Workload identity: SPIFFE ids, workload certificates and trust bundles, the certificate
//! authority that issues them, and the cache that keeps them fresh (DESIGN §5).
//!
//! `tls` builds HBONE TLS configs from [`WorkloadCertificate`] + [`TrustBundle`]; the node
//! obtains those through [`CertManager`], which fetches from a [`CertificateProvider`] such as
//! [`InProcessCa`].

mod ca;
mod caclient;
mod certificate;
mod manager;
mod provider;
mod spiffe;
pub mod x509;

pub use ca::{files as ca_files, CaConfig, CaError, CaSource, InProcessCa, DEFAULT_LEAF_TTL, DEFAULT_ROOT_TTL};
pub use caclient::RemoteCa;
pub use certificate::{ChainCert, TrustBundle, WorkloadCertError, WorkloadCertificate};
pub use manager::{CertError, CertManager, CertManagerConfig, CertSnapshot, CertState};
pub use provider::{CertificateProvider, FetchFuture, ProviderError};
pub use spiffe::{Identity, IdentityError};

#[cfg(test)]
mod tests;
