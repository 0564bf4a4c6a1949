//! Certificates from a remote CA speaking Istio's `IstioCertificateService/CreateCertificate`
//! (`CA_ADDRESS`): istiod, or our own controller. The node agent asks on behalf of each pod
//! identity, as Istio's ztunnel does: a fresh P-256 key per request, a CSR carrying the
//! SPIFFE URI, and `ImpersonatedIdentity` in the request metadata. The CA decides whether
//! this node may hold that identity.
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use ztunnel_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use ztunnel_proto::ca::IstioCertificateRequest;

use super::certificate::{TrustBundle, WorkloadCertificate};
use super::provider::{CertificateProvider, FetchFuture, ProviderError};
use super::spiffe::Identity;
use super::x509;
use crate::grpc::{with_bearer, ControlPlaneEndpoint};

/// Requests certificates from a remote CA.
pub struct RemoteCa {
    endpoint: ControlPlaneEndpoint,
    /// Roots peers' certificates must chain to; the CA's own roots when `None` (the last
    /// certificate of each returned chain).
    roots: Option<TrustBundle>,
    ttl: Duration,
}

impl RemoteCa {
    /// A client for `endpoint`, asking for certificates valid for `ttl`.
    pub fn new(endpoint: ControlPlaneEndpoint, roots: Option<TrustBundle>, ttl: Duration) -> Self {
        RemoteCa { endpoint, roots, ttl }
    }

    async fn request(&self, id: &Identity) -> Result<WorkloadCertificate, String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| format!("key: {e}"))?;
        let mut params = CertificateParams::default();
        let uri = id.to_string().try_into().map_err(|e| format!("SAN {id}: {e}"))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params.serialize_request(&key).and_then(|c| c.pem()).map_err(|e| format!("CSR: {e}"))?;
        let metadata = prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
            )]
            .into_iter()
            .collect(),
        };
        let req =
            IstioCertificateRequest { csr, validity_duration: self.ttl.as_secs() as i64, metadata: Some(metadata) };
        let bearer = self.endpoint.bearer().map_err(|e| e.to_string())?;
        let channel = self.endpoint.connect().await.map_err(|e| e.to_string())?;
        let mut client = IstioCertificateServiceClient::with_interceptor(channel, with_bearer(bearer));
        let resp = client.create_certificate(req).await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        let pems = resp.into_inner().cert_chain;
        let mut chain = Vec::new();
        for pem in &pems {
            chain.extend(x509::certs_from_pem(pem.as_bytes()).map_err(|e| format!("certificate chain: {e}"))?);
        }
        // Istio's convention: leaf first, root last. The root is trusted (unless roots are
        // configured) but not presented.
        let ca_root = if chain.len() > 1 { chain.pop() } else { None };
        let roots = match (&self.roots, ca_root) {
            (Some(r), _) => r.clone(),
            (None, Some(root)) => TrustBundle::new([root]),
            (None, None) => return Err("CA returned a chain without a root and no roots are configured".into()),
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let cert = WorkloadCertificate::new(chain, key, roots).map_err(|e| format!("certificate: {e}"))?;
        if cert.identity() != id {
            return Err(format!("CA issued {} instead of {id}", cert.identity()));
        }
        Ok(cert)
    }
}

impl CertificateProvider for RemoteCa {
    fn fetch<'a>(&'a self, id: &'a Identity) -> FetchFuture<'a> {
        Box::pin(async move {
            self.request(id).await.map_err(|e| ProviderError::Backend { identity: id.clone(), source: e.into() })
        })
    }
}
