//! rustls configurations exactly as HBONE needs them (DESIGN §5): TLS 1.3 only,
//! AES-128/256-GCM, ALPN `h2`, mutual SPIFFE authentication, no SNI.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use rustls::client::Resumption;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::ServerName;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tracing::debug;

use super::verify::{ExpectedIdentityServerVerifier, SameTrustDomainClientVerifier};
use crate::identity::{Identity, TrustBundle, WorkloadCertificate};

/// The only ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS configuration could not be built from certificate material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The trust bundle has no roots, so no peer could be accepted.
    #[error("trust bundle is empty")]
    EmptyTrustBundle,
    /// A root certificate cannot be used as a trust anchor.
    #[error("root certificate unusable as trust anchor: {0}")]
    BadRoot(rustls::Error),
    /// The client verifier could not be built.
    #[error("cannot build client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The workload certificate or key was rejected.
    #[error("workload certificate for {identity} unusable: {source}")]
    Certificate {
        /// The certificate's identity.
        identity: Identity,
        /// What rustls said.
        source: Box<rustls::Error>,
    },
    /// The client was given no identity to expect from the server.
    #[error("no expected server identities given")]
    NoExpectedIdentity,
    /// The protocol/cipher selection was refused (a bug).
    #[error("TLS protocol configuration rejected: {0}")]
    Protocol(rustls::Error),
}

/// The ring provider restricted to TLS 1.3 AES-GCM suites.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = ring::default_provider();
            p.cipher_suites =
                vec![ring::cipher_suite::TLS13_AES_128_GCM_SHA256, ring::cipher_suite::TLS13_AES_256_GCM_SHA384];
            Arc::new(p)
        })
        .clone()
}

fn root_store(trust: &TrustBundle) -> Result<Arc<RootCertStore>, TlsError> {
    if trust.is_empty() {
        return Err(TlsError::EmptyTrustBundle);
    }
    let mut store = RootCertStore::empty();
    for root in trust.roots() {
        store.add(root.clone()).map_err(TlsError::BadRoot)?;
    }
    Ok(Arc::new(store))
}

/// Server config presenting `cert` and requiring a client certificate that chains to `trust`
/// and carries a SPIFFE identity in `cert`'s trust domain.
pub fn server_config(cert: &WorkloadCertificate, trust: &TrustBundle) -> Result<ServerConfig, TlsError> {
    let provider = crypto_provider();
    let chain = WebPkiClientVerifier::builder_with_provider(root_store(trust)?, provider.clone()).build()?;
    let verifier = SameTrustDomainClientVerifier {
        chain,
        trust_domain: cert.identity().trust_domain().to_string(),
        provider: provider.clone(),
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Protocol)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain().to_vec(), cert.private_key())
        .map_err(|e| TlsError::Certificate { identity: cert.identity().clone(), source: Box::new(e) })?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection re-proves the peer's identity.
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    debug!(identity = %cert.identity(), "built HBONE server TLS config");
    Ok(cfg)
}

/// Client config presenting `cert` and accepting only a server whose SPIFFE SAN is one of
/// `expected` (the workload's identity plus its service's subjectAltNames). Sends no SNI.
pub fn client_config(
    cert: &WorkloadCertificate,
    trust: &TrustBundle,
    expected: Vec<Identity>,
) -> Result<ClientConfig, TlsError> {
    if expected.is_empty() {
        return Err(TlsError::NoExpectedIdentity);
    }
    let provider = crypto_provider();
    let verifier = ExpectedIdentityServerVerifier { roots: root_store(trust)?, expected, provider: provider.clone() };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Protocol)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain().to_vec(), cert.private_key())
        .map_err(|e| TlsError::Certificate { identity: cert.identity().clone(), source: Box::new(e) })?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    // Resumption is keyed by server name, which is a placeholder here; never reuse sessions.
    cfg.resumption = Resumption::disabled();
    Ok(cfg)
}

/// The placeholder server name for a connection: SNI is disabled, and the server's identity
/// is checked against the expected SPIFFE ids rather than a name.
pub fn server_name(addr: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.into())
}
