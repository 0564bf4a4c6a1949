//! Certificate verifiers enforcing HBONE's identity rules on top of webpki chain checks, and
//! a classification of handshake failures so callers can count them by reason.

use std::io;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme,
};

use crate::identity::{x509, Identity};

/// A peer certificate that chains correctly but fails the mesh's identity rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The peer presented no certificate at all.
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// The leaf has no SPIFFE URI SAN.
    #[error("peer certificate has no SPIFFE URI SAN (other URIs: {uris:?})")]
    NoSpiffeIdentity {
        /// Non-SPIFFE URIs on the leaf.
        uris: Vec<String>,
    },
    /// The client's identity belongs to another trust domain.
    #[error("peer identity {presented} is not in trust domain {expected:?}")]
    WrongTrustDomain {
        /// Our trust domain.
        expected: String,
        /// The peer's identity.
        presented: Identity,
    },
    /// The server's identity is not one the client expected for this destination.
    #[error("server identities {presented:?} match none of the expected {expected:?}")]
    SanMismatch {
        /// Identities acceptable for the destination.
        expected: Vec<Identity>,
        /// Identities in the server's certificate.
        presented: Vec<Identity>,
    },
    /// The leaf could not be parsed.
    #[error("peer certificate unparseable: {0}")]
    Unparseable(String),
}

impl From<VerifyError> for rustls::Error {
    fn from(e: VerifyError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// Why a handshake failed, coarse enough to be a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Peer in another trust domain.
    WrongTrustDomain,
    /// Server identity not among the expected ones.
    SanMismatch,
    /// Peer certificate carries no SPIFFE identity.
    NoSpiffeIdentity,
    /// Peer certificate (or a chain member) expired.
    Expired,
    /// Peer certificate not yet valid.
    NotYetValid,
    /// Chain does not lead to a trusted root (or its signature fails against the root of
    /// that name).
    UntrustedIssuer,
    /// Client sent no certificate.
    MissingClientCert,
    /// Malformed, badly signed, wrong purpose, or otherwise invalid certificate.
    BadCertificate,
    /// The peer rejected us with a TLS alert (e.g. it refused our certificate).
    PeerAlert,
    /// Other TLS protocol failure (version, cipher, ALPN, ...).
    Protocol,
    /// Transport failure, not a TLS decision.
    Io,
}

impl RejectReason {
    /// A stable snake_case label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::WrongTrustDomain => "wrong_trust_domain",
            RejectReason::SanMismatch => "san_mismatch",
            RejectReason::NoSpiffeIdentity => "no_spiffe_identity",
            RejectReason::Expired => "expired",
            RejectReason::NotYetValid => "not_yet_valid",
            RejectReason::UntrustedIssuer => "untrusted_issuer",
            RejectReason::MissingClientCert => "missing_client_cert",
            RejectReason::BadCertificate => "bad_certificate",
            RejectReason::PeerAlert => "peer_alert",
            RejectReason::Protocol => "protocol",
            RejectReason::Io => "io",
        }
    }

    /// Classifies a rustls error.
    pub fn from_rustls(e: &rustls::Error) -> Self {
        use CertificateError as C;
        match e {
            rustls::Error::NoCertificatesPresented => RejectReason::MissingClientCert,
            rustls::Error::AlertReceived(_) => RejectReason::PeerAlert,
            rustls::Error::InvalidCertificate(c) => match c {
                C::Expired | C::ExpiredContext { .. } => RejectReason::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => RejectReason::NotYetValid,
                // A root with the issuer's name but another key (two self-signed roots named
                // after the same trust domain) surfaces as a bad signature.
                C::UnknownIssuer | C::BadSignature => RejectReason::UntrustedIssuer,
                C::Other(OtherError(inner)) => match inner.downcast_ref::<VerifyError>() {
                    Some(VerifyError::WrongTrustDomain { .. }) => RejectReason::WrongTrustDomain,
                    Some(VerifyError::SanMismatch { .. }) => RejectReason::SanMismatch,
                    Some(VerifyError::NoSpiffeIdentity { .. }) => RejectReason::NoSpiffeIdentity,
                    Some(VerifyError::NoPeerCertificate) => RejectReason::MissingClientCert,
                    _ => RejectReason::BadCertificate,
                },
                _ => RejectReason::BadCertificate,
            },
            _ => RejectReason::Protocol,
        }
    }

    /// Classifies an I/O error from a tokio-rustls handshake or stream.
    pub fn from_io(e: &io::Error) -> Self {
        match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(tls) => Self::from_rustls(tls),
            None => RejectReason::Io,
        }
    }
}

/// The SPIFFE identities of a leaf certificate, in SAN order.
pub fn cert_identities(cert: &CertificateDer<'_>) -> Result<Vec<Identity>, VerifyError> {
    let info = x509::parse_cert(cert).map_err(|e| VerifyError::Unparseable(e.to_string()))?;
    if info.identities.is_empty() {
        return Err(VerifyError::NoSpiffeIdentity { uris: info.other_uris });
    }
    Ok(info.identities)
}

/// The identity of the peer of a completed handshake (its leaf's first SPIFFE SAN); the HBONE
/// server hands it to policy.
pub fn peer_identity(conn: &CommonState) -> Result<Identity, VerifyError> {
    let leaf = conn.peer_certificates().and_then(|c| c.first()).ok_or(VerifyError::NoPeerCertificate)?;
    Ok(cert_identities(leaf)?.swap_remove(0))
}

/// The identity half of both verifiers, once the peer's chain is verified: the leaf must carry
/// SPIFFE identities that `allowed` accepts; otherwise `refusal` says why, naming them.
fn check_identities(
    leaf: &CertificateDer<'_>,
    allowed: impl FnOnce(&[Identity]) -> bool,
    refusal: impl FnOnce(Vec<Identity>) -> VerifyError,
) -> Result<(), rustls::Error> {
    let presented = cert_identities(leaf)?;
    if allowed(&presented) {
        Ok(())
    } else {
        Err(refusal(presented).into())
    }
}

/// The handshake-signature methods both verifier traits declare alike: checked with the
/// algorithms of the verifier's `provider` (as rustls's webpki verifiers check them).
macro_rules! provider_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider.signature_verification_algorithms.supported_schemes()
        }
    };
}

/// Server side: requires a client certificate chaining to the bundle whose SPIFFE identity is
/// in our trust domain.
#[derive(Debug)]
pub(crate) struct SameTrustDomainClientVerifier {
    /// Checks the chain (webpki, client-auth usage) with `provider`'s algorithms.
    pub(crate) chain: Arc<dyn ClientCertVerifier>,
    pub(crate) trust_domain: String,
    pub(crate) provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SameTrustDomainClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chain.verify_client_cert(end_entity, intermediates, now)?;
        check_identities(
            end_entity,
            |ids| ids[0].trust_domain() == self.trust_domain,
            |mut ids| VerifyError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                presented: ids.swap_remove(0),
            },
        )?;
        Ok(ClientCertVerified::assertion())
    }

    provider_signature_checks!();
}

/// Client side: the server's chain must lead to the bundle and its SPIFFE SAN must be one of
/// the identities expected for the destination (the server name is ignored: no SNI).
#[derive(Debug)]
pub(crate) struct ExpectedIdentityServerVerifier {
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) expected: Vec<Identity>,
    pub(crate) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ExpectedIdentityServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        check_identities(
            end_entity,
            |ids| ids.iter().any(|id| self.expected.contains(id)),
            |ids| VerifyError::SanMismatch { expected: self.expected.clone(), presented: ids },
        )?;
        Ok(ServerCertVerified::assertion())
    }

    provider_signature_checks!();
}
