//! The seam between certificate consumers and whatever issues certificates (the in-process CA
//! today, Istio's `IstioCertificateService` later).

use std::future::Future;
use std::pin::Pin;

use super::ca::CaError;
use super::certificate::WorkloadCertificate;
use super::spiffe::Identity;

/// Why a provider could not produce a certificate.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The in-process CA failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A remote or custom backend failed.
    #[error("certificate backend failed for {identity}: {source}")]
    Backend {
        /// The identity being requested.
        identity: Identity,
        /// The backend's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The future returned by [`CertificateProvider::fetch`]; boxed so providers can be used as
/// `Arc<dyn CertificateProvider>`.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<WorkloadCertificate, ProviderError>> + Send + 'a>>;

/// Issues a fresh certificate for an identity; the [`super::CertManager`] caches and renews.
pub trait CertificateProvider: Send + Sync {
    /// Obtains a new certificate (new key) proving `id`.
    fn fetch<'a>(&'a self, id: &'a Identity) -> FetchFuture<'a>;
}
