//! Istio's CA service (`istio.v1.auth.IstioCertificateService`) backed by the in-process CA, so
//! node agents obtain workload certificates from the standalone controller as from istiod
//! (DESIGN §5). Like Istio's node authorization, a node may only obtain identities of workloads
//! scheduled on it: a compromised node cannot mint certificates for the rest of the mesh.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost_types::value::Kind;
use rcgen::{CertificateSigningRequestParams, SanType};
use tonic::{Request, Response, Status};
use tracing::{debug, info, info_span, warn};
use ztunnel_proto::ca::istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer};
use ztunnel_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};

use super::grpc::{authenticate, Authenticator};
use crate::identity::{x509, CaError, Identity, IdentityError, InProcessCa, DEFAULT_LEAF_TTL};

/// Decides whether `node` may hold `identity` (`Err` carries the reason shown to the caller); the
/// controller answers from its model: service accounts of pods scheduled on that node.
pub type NodeAuthorizer = Arc<dyn Fn(&str, &Identity) -> Result<(), String> + Send + Sync>;

/// The `metadata` key through which a node agent asks on behalf of a pod (Istio's name).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Lifetime when the request names none (Istio's default).
pub const DEFAULT_CERT_TTL: Duration = DEFAULT_LEAF_TTL;
/// Longest lifetime granted; longer requests are capped. Without revocation, short-lived
/// certificates are what limits a leaked key.
pub const DEFAULT_MAX_CERT_TTL: Duration = DEFAULT_LEAF_TTL;

/// Why a certificate request was refused, as counted (one counter per reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalReason {
    /// No or invalid bearer token.
    Unauthenticated,
    /// The CSR is not a parseable, correctly signed PEM CSR.
    MalformedCsr,
    /// The CSR's SANs are not exactly one SPIFFE URI.
    InvalidSan,
    /// The SAN is outside the CA's trust domain.
    WrongTrustDomain,
    /// `ImpersonatedIdentity` is malformed or differs from the SAN.
    ImpersonationMismatch,
    /// The node may not hold the identity.
    NodeNotAuthorized,
    /// Signing failed (a CA-side problem).
    SigningFailed,
}

impl RefusalReason {
    /// Stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Unauthenticated => "unauthenticated",
            RefusalReason::MalformedCsr => "malformed_csr",
            RefusalReason::InvalidSan => "invalid_san",
            RefusalReason::WrongTrustDomain => "wrong_trust_domain",
            RefusalReason::ImpersonationMismatch => "impersonation_mismatch",
            RefusalReason::NodeNotAuthorized => "node_not_authorized",
            RefusalReason::SigningFailed => "signing_failed",
        }
    }
}

/// Why a certificate request was refused; the message is what the caller sees.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// The CSR could not be parsed or its signature does not verify.
    #[error("malformed CSR (expected a PEM \"CERTIFICATE REQUEST\" signed by its key): {0}")]
    Malformed(String),
    /// The CSR does not carry exactly one SAN, a URI.
    #[error("CSR must carry exactly one subject alternative name, a SPIFFE URI; it has [{0}]")]
    SanCount(String),
    /// The URI SAN is not an Istio SPIFFE id.
    #[error("CSR SAN is not a SPIFFE workload identity: {0}")]
    NotSpiffe(IdentityError),
    /// The identity belongs to another trust domain.
    #[error("CSR SAN {identity} is outside trust domain {trust_domain:?}")]
    WrongTrustDomain {
        /// The requested identity.
        identity: Identity,
        /// This CA's trust domain.
        trust_domain: String,
    },
    /// `ImpersonatedIdentity` is not a string.
    #[error("metadata {IMPERSONATED_IDENTITY} must be a string SPIFFE id")]
    BadImpersonation,
    /// `ImpersonatedIdentity` differs from the CSR's SAN.
    #[error("metadata {IMPERSONATED_IDENTITY} {impersonated:?} does not match the CSR SAN {csr}")]
    ImpersonationMismatch {
        /// What the metadata asked for.
        impersonated: String,
        /// What the CSR carries.
        csr: Identity,
    },
    /// The node may not hold the identity.
    #[error("node {node} may not hold {identity}: {reason}")]
    NotAuthorized {
        /// The authenticated node.
        node: String,
        /// The requested identity.
        identity: Identity,
        /// Why (from the authorizer).
        reason: String,
    },
    /// The CA failed to sign.
    #[error("signing failed: {0}")]
    Signing(#[from] CaError),
}

impl CsrError {
    /// The counter this refusal increments.
    pub fn reason(&self) -> RefusalReason {
        match self {
            CsrError::Malformed(_) => RefusalReason::MalformedCsr,
            CsrError::SanCount(_) | CsrError::NotSpiffe(_) => RefusalReason::InvalidSan,
            CsrError::WrongTrustDomain { .. } => RefusalReason::WrongTrustDomain,
            CsrError::BadImpersonation | CsrError::ImpersonationMismatch { .. } => RefusalReason::ImpersonationMismatch,
            CsrError::NotAuthorized { .. } => RefusalReason::NodeNotAuthorized,
            CsrError::Signing(_) => RefusalReason::SigningFailed,
        }
    }

    fn status(&self) -> Status {
        let msg = self.to_string();
        match self.reason() {
            RefusalReason::NodeNotAuthorized => Status::permission_denied(msg),
            RefusalReason::SigningFailed => Status::internal(msg),
            _ => Status::invalid_argument(msg),
        }
    }
}

struct CaInner {
    ca: Arc<InProcessCa>,
    authenticator: Authenticator,
    authorizer: NodeAuthorizer,
    issued: AtomicU64,
    refusals: Mutex<BTreeMap<RefusalReason, u64>>,
}

/// The CA gRPC service. Cheap to clone: clones share the CA and the counters.
#[derive(Clone)]
pub struct CaServer {
    inner: Arc<CaInner>,
    default_ttl: Duration,
    max_ttl: Duration,
}

impl CaServer {
    /// Signs with `ca` for callers `authenticator` recognises, for identities `authorizer`
    /// allows their node, with Istio's default TTLs.
    pub fn new(ca: Arc<InProcessCa>, authenticator: Authenticator, authorizer: NodeAuthorizer) -> Self {
        CaServer {
            inner: Arc::new(CaInner {
                ca,
                authenticator,
                authorizer,
                issued: AtomicU64::new(0),
                refusals: Mutex::new(BTreeMap::new()),
            }),
            default_ttl: DEFAULT_CERT_TTL,
            max_ttl: DEFAULT_MAX_CERT_TTL,
        }
    }

    /// Sets the lifetime used when a request names none, and the cap on requested lifetimes.
    pub fn with_ttls(self, default_ttl: Duration, max_ttl: Duration) -> Self {
        CaServer { default_ttl: default_ttl.min(max_ttl), max_ttl, ..self }
    }

    /// The tonic service to mount on a server.
    pub fn into_service(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
    }

    /// Certificates issued since start.
    pub fn issued_total(&self) -> u64 {
        self.inner.issued.load(Ordering::Relaxed)
    }

    /// Requests refused for `reason` since start.
    pub fn refusals(&self, reason: RefusalReason) -> u64 {
        self.lock_refusals().get(&reason).copied().unwrap_or(0)
    }

    /// Requests refused since start, all reasons.
    pub fn refusals_total(&self) -> u64 {
        self.lock_refusals().values().sum()
    }

    fn lock_refusals(&self) -> std::sync::MutexGuard<'_, BTreeMap<RefusalReason, u64>> {
        self.inner.refusals.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, reason: RefusalReason) {
        *self.lock_refusals().entry(reason).or_insert(0) += 1;
    }

    /// Validates and signs `req` for the authenticated `node`, returning the PEM chain: leaf
    /// first, then intermediates, root last (Istio's convention: clients take the last as root).
    pub fn sign(&self, node: &str, req: &IstioCertificateRequest) -> Result<Vec<String>, CsrError> {
        let ca = &self.inner.ca;
        let csr =
            CertificateSigningRequestParams::from_pem(&req.csr).map_err(|e| CsrError::Malformed(e.to_string()))?;
        let identity = match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] => uri.as_str().parse::<Identity>().map_err(CsrError::NotSpiffe)?,
            sans => return Err(CsrError::SanCount(describe_sans(sans))),
        };
        if let Some(value) = req.metadata.as_ref().and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)) {
            let Some(Kind::StringValue(impersonated)) = &value.kind else {
                return Err(CsrError::BadImpersonation);
            };
            if impersonated.parse::<Identity>().ok().as_ref() != Some(&identity) {
                return Err(CsrError::ImpersonationMismatch { impersonated: impersonated.clone(), csr: identity });
            }
        }
        if identity.trust_domain() != ca.trust_domain() {
            return Err(CsrError::WrongTrustDomain { identity, trust_domain: ca.trust_domain().to_string() });
        }
        (self.inner.authorizer)(node, &identity).map_err(|reason| CsrError::NotAuthorized {
            node: node.to_string(),
            identity: identity.clone(),
            reason,
        })?;
        let ttl = match u64::try_from(req.validity_duration) {
            Ok(0) | Err(_) => self.default_ttl,
            Ok(secs) => Duration::from_secs(secs).min(self.max_ttl),
        };
        let mut chain = ca.sign_csr(&req.csr, &identity, ttl)?;
        for root in ca.trust_bundle().roots() {
            if !chain.contains(root) {
                chain.push(root.clone());
            }
        }
        info!(identity = %identity, ttl_secs = ttl.as_secs(), "issued workload certificate");
        Ok(chain.iter().map(|c| x509::certs_to_pem([c])).collect())
    }
}

fn describe_sans(sans: &[SanType]) -> String {
    let describe = |san: &SanType| match san {
        SanType::URI(u) => format!("URI {}", u.as_str()),
        SanType::DnsName(d) => format!("DNS {}", d.as_str()),
        SanType::Rfc822Name(e) => format!("email {}", e.as_str()),
        SanType::IpAddress(ip) => format!("IP {ip}"),
        other => format!("{other:?}"),
    };
    sans.iter().map(describe).collect::<Vec<_>>().join(", ")
}

#[tonic::async_trait]
impl IstioCertificateService for CaServer {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let node = match authenticate(&self.inner.authenticator, request.metadata()) {
            Ok(node) => node,
            Err(status) => {
                self.refuse(RefusalReason::Unauthenticated);
                warn!(peer = ?request.remote_addr(), reason = status.message(), "certificate request refused");
                return Err(status);
            }
        };
        let _span = info_span!("ca_request", node).entered();
        match self.sign(&node, request.get_ref()) {
            Ok(cert_chain) => {
                self.inner.issued.fetch_add(1, Ordering::Relaxed);
                debug!(certs = cert_chain.len(), "certificate chain returned");
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(err) => {
                self.refuse(err.reason());
                warn!(reason = err.reason().as_str(), error = %err, "certificate request refused");
                Err(err.status())
            }
        }
    }
}

#[cfg(test)]
#[path = "ca_tests.rs"]
mod tests;
