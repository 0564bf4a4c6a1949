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

    /// The chain as an operator reads it (`ztunnel ctl certificates`): each presented
    /// certificate, leaf first, then the root of the bundle that issued the last one (the
    /// anchor peers verify against), unless the chain already ends in a self-signed root.
    /// Without a matching root the list ends at the last presented certificate, which is how
    /// a chain no peer will accept shows. Parsed on each call: meant for the admin thread.
    pub fn trust_chain(&self) -> Vec<ChainCert> {
        let mut out: Vec<ChainCert> =
            self.chain.iter().filter_map(|der| x509::parse_cert(der).ok()).map(ChainCert::from_info).collect();
        let Some(last) = out.last() else { return out };
        if last.subject == last.issuer && last.is_ca {
            if let Some(l) = out.last_mut() {
                l.root = true;
            }
            return out;
        }
        let issuer = last.issuer.clone();
        let root = self
            .roots
            .roots()
            .iter()
            .filter_map(|der| x509::parse_cert(der).ok())
            .find(|r| r.subject == issuer && r.is_ca)
            .map(ChainCert::from_info);
        if let Some(mut root) = root {
            root.root = true;
            out.push(root);
        }
        out
    }
}

/// One certificate of a workload certificate's trust chain, as `/config_dump` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainCert {
    /// Subject DN (empty for the usual SPIFFE leaf).
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Serial number as lowercase hex.
    pub serial: String,
    /// Start of validity, seconds since the epoch.
    pub not_before_unix: Option<u64>,
    /// End of validity, seconds since the epoch.
    pub not_after_unix: Option<u64>,
    /// Whether it may issue certificates.
    pub is_ca: bool,
    /// Whether it is the trust anchor (a root of the bundle, or a self-signed end of the chain).
    pub root: bool,
}

impl ChainCert {
    fn from_info(info: x509::CertInfo) -> Self {
        let unix = |t: SystemTime| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).ok();
        ChainCert {
            subject: info.subject,
            issuer: info.issuer,
            serial: info.serial,
            not_before_unix: unix(info.not_before),
            not_after_unix: unix(info.not_after),
            is_ca: info.is_ca,
            root: false,
        }
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

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

    use super::*;

    fn ca_params(cn: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        p
    }

    /// A leaf issued by an intermediate of `root_cn`; the chain presented is leaf and
    /// intermediate, the bundle holds `bundle_cn`'s root.
    fn issued_through_intermediate(root_cn: &str, bundle_cn: &str) -> WorkloadCertificate {
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params(root_cn);
        let root_issuer = Issuer::new(root_params, root_key);
        let int_key = KeyPair::generate().unwrap();
        let int_params = ca_params("mesh intermediate");
        let int = int_params.clone().signed_by(&int_key, &root_issuer).unwrap();
        let int_issuer = Issuer::new(int_params, int_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params = CertificateParams::default();
        leaf_params.distinguished_name = rcgen::DistinguishedName::new();
        leaf_params.subject_alt_names =
            vec![SanType::URI("spiffe://cluster.local/ns/default/sa/web".try_into().unwrap())];
        let leaf = leaf_params.signed_by(&leaf_key, &int_issuer).unwrap();
        let bundle_key = KeyPair::generate().unwrap();
        let bundle_root = ca_params(bundle_cn).self_signed(&bundle_key).unwrap();
        let key = PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let chain = vec![leaf.der().clone(), int.der().clone()];
        WorkloadCertificate::new(chain, key, TrustBundle::new([bundle_root.der().clone()])).unwrap()
    }

    #[test]
    fn the_trust_chain_ends_with_the_bundle_root_that_issued_the_last_presented_certificate() {
        let cert = issued_through_intermediate("mesh root", "mesh root");
        let chain = cert.trust_chain();
        let subjects: Vec<&str> = chain.iter().map(|c| c.subject.as_str()).collect();
        assert_eq!(subjects, ["", "CN=mesh intermediate", "CN=mesh root"]);
        assert_eq!(chain.iter().map(|c| c.root).collect::<Vec<_>>(), [false, false, true]);
        assert_eq!(chain[0].serial, cert.serial());
        assert_eq!(chain[1].issuer, "CN=mesh root");
    }

    #[test]
    fn a_chain_no_bundle_root_issued_ends_without_a_root() {
        let cert = issued_through_intermediate("mesh root", "another root");
        let chain = cert.trust_chain();
        assert_eq!(chain.len(), 2);
        assert!(chain.iter().all(|c| !c.root));
        assert_eq!(chain[1].issuer, "CN=mesh root");
    }

    #[test]
    fn a_chain_ending_in_a_self_signed_root_marks_that_root() {
        let ca = super::super::InProcessCa::new(super::super::CaConfig::new("cluster.local")).unwrap();
        let cert = ca.issue(&Identity::new("cluster.local", "default", "web").unwrap()).unwrap();
        let chain = cert.trust_chain();
        assert_eq!(chain.len(), 2, "leaf and root, the root not repeated from the bundle");
        assert!(chain[1].root && chain[1].is_ca && !chain[0].root);
        assert_eq!(chain[1].subject, "O=cluster.local");
        assert_eq!(chain[0].issuer, chain[1].subject);
    }
}
