//! Server certificates of the ingress gateway's `SIMPLE` TLS servers, from PEM files or
//! `kubernetes.io/tls` Secrets, turned into rustls configs (ALPN h2 and http/1.1) and kept
//! while their PEM is unchanged, so a handshake does not parse certificates again.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::routing::ingress::{Credential, TlsSecret};

/// Why a server has no usable certificate (its connections are closed, others go on).
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("Secret {0} not found (or not a kubernetes.io/tls Secret)")]
    NoSecret(String),
    #[error("reading {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("{0}: no certificate in the PEM")]
    NoCertificate(String),
    #[error("{0}: no private key in the PEM")]
    NoKey(String),
    #[error("{0}: {1}")]
    Rustls(String, rustls::Error),
}

/// A built config with the PEM (certificate, then key) it was built from.
type Built = (Vec<u8>, Arc<ServerConfig>);

/// Built configs by credential, with the PEM they were built from.
#[derive(Default)]
pub struct Certificates {
    built: Mutex<HashMap<Credential, Built>>,
}

impl Certificates {
    /// The rustls config for `cred`, from `secrets` or its files.
    pub fn server_config(
        &self,
        cred: &Credential,
        secrets: &BTreeMap<String, TlsSecret>,
    ) -> Result<Arc<ServerConfig>, CertError> {
        let (name, cert_pem, key_pem) = match cred {
            Credential::Secret(name) => {
                let s = secrets.get(name).ok_or_else(|| CertError::NoSecret(name.clone()))?;
                (name.clone(), s.cert_pem.clone(), s.key_pem.clone())
            }
            Credential::Files { cert, key } => {
                let read = |p: &std::path::Path| {
                    std::fs::read(p).map_err(|source| CertError::File { path: p.display().to_string(), source })
                };
                (cert.display().to_string(), read(cert)?, read(key)?)
            }
        };
        let mut fingerprint = cert_pem.clone();
        fingerprint.extend_from_slice(&key_pem);
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((pem, cfg)) = built.get(cred) {
            if *pem == fingerprint {
                return Ok(cfg.clone());
            }
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&cert_pem).filter_map(Result::ok).collect();
        if chain.is_empty() {
            return Err(CertError::NoCertificate(name));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| CertError::NoKey(name.clone()))?;
        let mut cfg = ServerConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| CertError::Rustls(name.clone(), e))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| CertError::Rustls(name.clone(), e))?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        built.insert(cred.clone(), (fingerprint, cfg.clone()));
        Ok(cfg)
    }
}
