//! Workload certificates and the trust bundle they are verified against.

use std::fmt;
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::spiffe::Identity;
use super::x509::{self, CertParseError};

/// Why a certificate chain and key cannot serve as a workload certificate.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadCertError {
    /// The chain is empty.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// The leaf or key could not be parsed.
    #[error("cannot parse workload certificate material: {0}")]
    Parse(#[from] CertParseError),
    /// The leaf has no SPIFFE URI SAN, so it proves no mesh identity.
    #[error("leaf certificate has no SPIFFE URI SAN (other URIs: {uris:?})")]
    NoIdentity {
        /// Non-SPIFFE URI SANs found on the leaf.
        uris: Vec<String>,
    },
}

/// The set of root certificates peers must chain to; holds several so a root can be rotated
/// without breaking peers that still present certificates from the old one.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// A bundle of the given roots (duplicates dropped).
    pub fn new(roots: impl IntoIterator<Item = CertificateDer<'static>>) -> Self {
        let mut bundle = TrustBundle::default();
        for root in roots {
            bundle.add(root);
        }
        bundle
    }

    /// Reads every certificate in a PEM document (e.g. Istio's `root-cert.pem`).
    pub fn from_pem(pem: &[u8]) -> Result<Self, CertParseError> {
        Ok(Self::new(x509::certs_from_pem(pem)?))
    }

    /// The bundle as PEM, for persisting or for /config_dump.
    pub fn to_pem(&self) -> String {
        x509::certs_to_pem(&self.roots)
    }

    /// Adds a root (e.g. the next root during rotation); returns false if already present.
    pub fn add(&mut self, root: CertificateDer<'static>) -> bool {
        if self.roots.contains(&root) {
            return false;
        }
        self.roots.push(root);
        true
    }

    /// Adds every root of `other`.
    pub fn merge(&mut self, other: &TrustBundle) {
        for root in &other.roots {
            self.add(root.clone());
        }
    }

    /// Removes a root (end of a rotation); returns whether it was present.
    pub fn remove(&mut self, root: &CertificateDer<'_>) -> bool {
        let before = self.roots.len();
        self.roots.retain(|r| r.as_ref() != root.as_ref());
        before != self.roots.len()
    }

    /// The roots, in insertion order.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Whether the bundle trusts nothing.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let serials: Vec<String> = self
            .roots
            .iter()
            .map(|r| x509::parse_cert(r).map(|i| i.serial).unwrap_or_else(|_| "<unparseable>".into()))
            .collect();
        f.debug_struct("TrustBundle").field("root_serials", &serials).finish()
    }
}

/// A workload's certificate chain and private key plus the facts callers need without
/// re-parsing: the identity it proves, its validity window, serial and the roots to trust.
pub struct WorkloadCertificate {
    identity: Identity,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
    roots: TrustBundle,
}

impl WorkloadCertificate {
    /// Builds from a leaf-first chain, its key and the roots; the identity is the leaf's first
    /// SPIFFE URI SAN.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: TrustBundle,
    ) -> Result<Self, WorkloadCertError> {
        let leaf = chain.first().ok_or(WorkloadCertError::EmptyChain)?;
        let info = x509::parse_cert(leaf)?;
        let identity =
            info.identities.first().cloned().ok_or(WorkloadCertError::NoIdentity { uris: info.other_uris.clone() })?;
        Ok(WorkloadCertificate {
            identity,
            chain,
            key,
            not_before: info.not_before,
            not_after: info.not_after,
            serial: info.serial,
            roots,
        })
    }

    /// Builds from PEM documents: the chain (leaf first), the key, and the roots.
    pub fn from_pem(chain: &[u8], key: &[u8], roots: &[u8]) -> Result<Self, WorkloadCertError> {
        let chain = x509::certs_from_pem(chain)?;
        let key = PrivateKeyDer::Pkcs8(x509::pkcs8_key_from_pem(key)?);
        Self::new(chain, key, TrustBundle::from_pem(roots)?)
    }

    /// The SPIFFE identity the certificate proves.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The leaf-first chain presented in handshakes.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// A copy of the private key, for building TLS configs.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial number (lowercase hex), for /config_dump and logs.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The roots the issuing CA says to trust.
    pub fn roots(&self) -> &TrustBundle {
        &self.roots
    }

    /// When to renew: half way through the validity window (Istio's choice).
    pub fn refresh_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + life / 2
    }

    /// Whether the leaf is outside its validity window at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after || now < self.not_before
    }

    /// The chain as PEM.
    pub fn chain_pem(&self) -> String {
        x509::certs_to_pem(&self.chain)
    }
}

impl Clone for WorkloadCertificate {
    fn clone(&self) -> Self {
        WorkloadCertificate {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
            serial: self.serial.clone(),
            roots: self.roots.clone(),
        }
    }
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}
