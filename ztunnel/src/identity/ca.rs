//! An in-process certificate authority, so a standalone deployment (DESIGN §5: "the project's
//! controller is that CA") can issue workload certificates without Istio.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tracing::{info, instrument};

use super::certificate::{TrustBundle, WorkloadCertError, WorkloadCertificate};
use super::provider::{CertificateProvider, FetchFuture};
use super::spiffe::Identity;
use super::x509::{self, CertParseError};

/// File names of Istio's plug-in CA layout (`/etc/cacerts`), also used to persist our own root.
pub mod files {
    /// The signing (CA) certificate.
    pub const CA_CERT: &str = "ca-cert.pem";
    /// The signing key.
    pub const CA_KEY: &str = "ca-key.pem";
    /// The root(s) to trust.
    pub const ROOT_CERT: &str = "root-cert.pem";
    /// The chain from the signing cert up to the root, appended to issued leaves.
    pub const CERT_CHAIN: &str = "cert-chain.pem";
}

/// Default lifetime of issued workload certificates (Istio's default).
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default lifetime of a generated self-signed root.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why the CA could not load, generate, or issue.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing CA files failed.
    #[error("CA file {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA file is not valid PEM/X.509.
    #[error("CA file {path}: {source}")]
    Parse {
        /// The file involved.
        path: PathBuf,
        /// The parse error.
        source: CertParseError,
    },
    /// A required file of the CA directory is missing.
    #[error("CA directory {dir} is incomplete: missing {file}")]
    Incomplete {
        /// The directory.
        dir: PathBuf,
        /// The missing file name.
        file: &'static str,
    },
    /// The CA key cannot be used for signing.
    #[error("CA key {path} is unusable: {source}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What rcgen said.
        source: rcgen::Error,
    },
    /// The signing certificate is not a CA certificate.
    #[error("{path} is not a CA certificate (basicConstraints CA=false or missing)")]
    NotACa {
        /// The certificate file.
        path: PathBuf,
    },
    /// The key does not belong to the signing certificate.
    #[error("CA key {key} does not match certificate {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The request is for another trust domain than this CA serves.
    #[error("CA for trust domain {ca_trust_domain:?} refuses to issue for {identity}")]
    WrongTrustDomain {
        /// The requested identity.
        identity: Identity,
        /// The CA's trust domain.
        ca_trust_domain: String,
    },
    /// The requested validity window is empty.
    #[error("requested validity for {identity} is empty (not_after <= not_before)")]
    EmptyValidity {
        /// The requested identity.
        identity: Identity,
    },
    /// The CSR could not be parsed or its signature is wrong.
    #[error("invalid CSR for {identity}: {source}")]
    Csr {
        /// The requested identity.
        identity: Identity,
        /// What rcgen said.
        source: rcgen::Error,
    },
    /// Building or signing a certificate failed.
    #[error("signing certificate for {what} failed: {source}")]
    Sign {
        /// What was being signed.
        what: String,
        /// What rcgen said.
        source: rcgen::Error,
    },
    /// The freshly issued certificate was unusable (a bug).
    #[error("issued certificate is unusable: {0}")]
    Issued(#[from] WorkloadCertError),
}

/// Where the CA's signing material comes from, chosen by [`CaConfig`].
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// Trust domain of the identities this CA issues for.
    pub trust_domain: String,
    /// Istio plug-in CA directory; when set, its files must exist and are used as-is.
    pub plugin_dir: Option<PathBuf>,
    /// Where a generated self-signed root is persisted (and reloaded after restarts).
    pub state_dir: Option<PathBuf>,
    /// Lifetime of issued workload certificates.
    pub leaf_ttl: Duration,
    /// Lifetime of a generated root.
    pub root_ttl: Duration,
}

impl CaConfig {
    /// An in-memory CA for `trust_domain` with Istio's default TTLs.
    pub fn new(trust_domain: impl Into<String>) -> Self {
        CaConfig {
            trust_domain: trust_domain.into(),
            plugin_dir: None,
            state_dir: None,
            leaf_ttl: DEFAULT_LEAF_TTL,
            root_ttl: DEFAULT_ROOT_TTL,
        }
    }
}

/// Where a running CA got its signing material; reported in logs and /config_dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// Istio plug-in CA files.
    Plugin(PathBuf),
    /// A root generated earlier and reloaded from the state directory.
    Reloaded(PathBuf),
    /// A root generated now and written to the state directory.
    Generated(PathBuf),
    /// A root generated now, kept only in memory.
    Memory,
}

/// Issues ECDSA P-256 workload certificates whose URI SAN is the SPIFFE identity.
pub struct InProcessCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// Appended after each leaf: the signing cert and any intermediates up to the root.
    chain: Vec<CertificateDer<'static>>,
    roots: TrustBundle,
    leaf_ttl: Duration,
    source: CaSource,
}

impl InProcessCa {
    /// Loads plug-in CA files, else reloads or generates a persisted root, else generates an
    /// in-memory root.
    #[instrument(name = "ca_init", skip_all, fields(trust_domain = %cfg.trust_domain))]
    pub fn new(cfg: CaConfig) -> Result<Self, CaError> {
        let (signing, source) = if let Some(dir) = &cfg.plugin_dir {
            (load_dir(dir)?, CaSource::Plugin(dir.clone()))
        } else if let Some(dir) = &cfg.state_dir {
            if dir.join(files::CA_CERT).exists() || dir.join(files::CA_KEY).exists() {
                (load_dir(dir)?, CaSource::Reloaded(dir.clone()))
            } else {
                let generated = generate_root(&cfg.trust_domain, cfg.root_ttl)?;
                persist(dir, &generated)?;
                (generated, CaSource::Generated(dir.clone()))
            }
        } else {
            (generate_root(&cfg.trust_domain, cfg.root_ttl)?, CaSource::Memory)
        };
        info!(source = ?source, roots = ?signing.roots, "in-process CA ready");
        Ok(InProcessCa {
            trust_domain: cfg.trust_domain,
            issuer: signing.issuer,
            chain: signing.chain,
            roots: signing.roots,
            leaf_ttl: cfg.leaf_ttl,
            source,
        })
    }

    /// The roots peers must trust to accept certificates from this CA.
    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.roots
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Where the signing material came from.
    pub fn source(&self) -> &CaSource {
        &self.source
    }

    /// Issues a certificate for `id` valid from now for the configured TTL.
    pub fn issue(&self, id: &Identity) -> Result<WorkloadCertificate, CaError> {
        let now = SystemTime::now();
        // Backdate slightly so peers with a small clock skew accept the certificate.
        self.issue_with_validity(id, now - Duration::from_secs(60), now + self.leaf_ttl)
    }

    /// Issues a certificate with an explicit validity window (tests use expired ones).
    #[instrument(name = "ca_issue", skip(self), fields(identity = %id))]
    pub fn issue_with_validity(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate, CaError> {
        self.issue_with_sans(id, &[], not_before, not_after)
    }

    /// Issues a serving certificate for a control-plane endpoint: the SPIFFE identity plus DNS
    /// names and IPs clients dial, so both SPIFFE-aware peers and hostname-verifying gRPC clients
    /// (Istio's ztunnel checks `istiod.istio-system.svc`) accept it.
    pub fn issue_server(
        &self,
        id: &Identity,
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> Result<WorkloadCertificate, CaError> {
        let mut extra = Vec::with_capacity(dns_names.len() + ips.len());
        for name in dns_names {
            let name =
                (*name).to_string().try_into().map_err(|source| CaError::Sign { what: name.to_string(), source })?;
            extra.push(SanType::DnsName(name));
        }
        extra.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let now = SystemTime::now();
        self.issue_with_sans(id, &extra, now - Duration::from_secs(60), now + self.leaf_ttl)
    }

    fn issue_with_sans(
        &self,
        id: &Identity,
        extra_sans: &[SanType],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|source| CaError::Sign { what: id.to_string(), source })?;
        let leaf = self.sign_leaf(id, extra_sans, &key, not_before, not_after)?;
        let mut chain = vec![leaf];
        chain.extend(self.chain.iter().cloned());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(WorkloadCertificate::new(chain, key, self.roots.clone())?)
    }

    /// Signs a PEM CSR for `id` (the CSR's own names are replaced by `id`), returning the
    /// leaf-first chain as Istio's `CreateCertificate` does.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &Identity,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|source| CaError::Csr { identity: id.clone(), source })?;
        let now = SystemTime::now();
        let leaf = self.sign_leaf(id, &[], &csr.public_key, now - Duration::from_secs(60), now + ttl)?;
        let mut chain = vec![leaf];
        chain.extend(self.chain.iter().cloned());
        Ok(chain)
    }

    fn sign_leaf(
        &self,
        id: &Identity,
        extra_sans: &[SanType],
        public_key: &impl PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertificateDer<'static>, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::WrongTrustDomain { identity: id.clone(), ca_trust_domain: self.trust_domain.clone() });
        }
        if not_after <= not_before {
            return Err(CaError::EmptyValidity { identity: id.clone() });
        }
        let sign_err = |source| CaError::Sign { what: id.to_string(), source };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_uri().try_into().map_err(sign_err)?)];
        params.subject_alt_names.extend(extra_sans.iter().cloned());
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer).map_err(sign_err)?;
        Ok(cert.der().clone())
    }
}

impl CertificateProvider for InProcessCa {
    fn fetch<'a>(&'a self, id: &'a Identity) -> FetchFuture<'a> {
        Box::pin(async move { Ok(self.issue(id)?) })
    }
}

struct SigningMaterial {
    issuer: Issuer<'static, KeyPair>,
    key_pem: String,
    ca_cert: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    roots: TrustBundle,
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    SystemRandom::new().fill(&mut bytes).expect("system RNG unavailable");
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // and no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

fn generate_root(trust_domain: &str, ttl: Duration) -> Result<SigningMaterial, CaError> {
    let sign_err = |source| CaError::Sign { what: "self-signed root".into(), source };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    params.distinguished_name = dn;
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + ttl).into();
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).map_err(sign_err)?;
    let der = cert.der().clone();
    Ok(SigningMaterial {
        key_pem: key.serialize_pem(),
        issuer: Issuer::new(params, key),
        chain: vec![der.clone()],
        roots: TrustBundle::new([der.clone()]),
        ca_cert: der,
    })
}

fn read(dir: &Path, file: &'static str) -> Result<Vec<u8>, CaError> {
    let path = dir.join(file);
    fs::read(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CaError::Incomplete { dir: dir.to_path_buf(), file },
        _ => CaError::Io { path, source },
    })
}

fn read_certs(dir: &Path, file: &'static str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    x509::certs_from_pem(&read(dir, file)?).map_err(|source| CaError::Parse { path: dir.join(file), source })
}

/// Loads the plug-in layout: `ca-cert.pem` + `ca-key.pem` required, `root-cert.pem` required
/// unless the CA cert is itself the root, `cert-chain.pem` defaulting to `ca-cert.pem`.
fn load_dir(dir: &Path) -> Result<SigningMaterial, CaError> {
    let (cert_path, key_path) = (dir.join(files::CA_CERT), dir.join(files::CA_KEY));
    let ca_cert = read_certs(dir, files::CA_CERT)?.swap_remove(0);
    let key_pem = read(dir, files::CA_KEY)?;
    let pkcs8 =
        x509::pkcs8_key_from_pem(&key_pem).map_err(|source| CaError::Parse { path: key_path.clone(), source })?;
    let key = KeyPair::try_from(&pkcs8).map_err(|source| CaError::Key { path: key_path.clone(), source })?;

    let info = x509::parse_cert(&ca_cert).map_err(|source| CaError::Parse { path: cert_path.clone(), source })?;
    if !info.is_ca {
        return Err(CaError::NotACa { path: cert_path });
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(&ca_cert)
        .map_err(|e| CaError::Parse { path: cert_path.clone(), source: CertParseError::Der(e.to_string()) })?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(CaError::KeyMismatch { cert: cert_path, key: key_path });
    }
    let self_signed = parsed.subject() == parsed.issuer();

    let chain = match read_certs(dir, files::CERT_CHAIN) {
        Ok(chain) => chain,
        Err(CaError::Incomplete { .. }) => vec![ca_cert.clone()],
        Err(e) => return Err(e),
    };
    let roots = match read_certs(dir, files::ROOT_CERT) {
        Ok(roots) => TrustBundle::new(roots),
        Err(CaError::Incomplete { .. }) if self_signed => TrustBundle::new([ca_cert.clone()]),
        Err(e) => return Err(e),
    };
    let issuer = Issuer::from_ca_cert_der(&ca_cert, key).map_err(|source| CaError::Key { path: cert_path, source })?;
    Ok(SigningMaterial { issuer, key_pem: String::from_utf8_lossy(&key_pem).into_owned(), ca_cert, chain, roots })
}

/// Writes the generated root in the plug-in layout, atomically per file, key mode 0600.
fn persist(dir: &Path, m: &SigningMaterial) -> Result<(), CaError> {
    fs::create_dir_all(dir).map_err(|source| CaError::Io { path: dir.to_path_buf(), source })?;
    let cert_pem = x509::certs_to_pem([&m.ca_cert]);
    // Key first: a crash after it but before the cert leaves a dir that fails loudly, not a
    // cert whose key is lost.
    write_atomic(&dir.join(files::CA_KEY), m.key_pem.as_bytes(), 0o600)?;
    write_atomic(&dir.join(files::CERT_CHAIN), cert_pem.as_bytes(), 0o644)?;
    write_atomic(&dir.join(files::ROOT_CERT), m.roots.to_pem().as_bytes(), 0o644)?;
    write_atomic(&dir.join(files::CA_CERT), cert_pem.as_bytes(), 0o644)?;
    Ok(())
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("pem.tmp");
    let io_err = |source| CaError::Io { path: path.to_path_buf(), source };
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io_err)?;
    f.write_all(data).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)
}
