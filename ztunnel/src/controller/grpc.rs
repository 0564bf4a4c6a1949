//! The controller's one gRPC listener: node agents reach both the delta ADS server and the CA at
//! the same TLS address, as they reach istiod (DESIGN §5, §6). Also holds what both services
//! share: bearer-token authentication of the calling node.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity as TonicIdentity, Server, ServerTlsConfig};
use tonic::Status;
use tracing::info;

use super::ads::AdsServer;
use super::ca::CaServer;
use crate::identity::{x509, CaError, Identity, IdentityError, InProcessCa, WorkloadCertificate};

/// Maps a bearer token (`authorization: Bearer <token>`) to the node it was issued to, or `None`
/// when the token is not valid. Pluggable so the controller can check Kubernetes service-account
/// tokens while tests and local setups use fixed tables.
pub type Authenticator = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Namespace of the controller's own identity, Istio's choice so node agents configured for
/// istiod accept it.
pub const CONTROLLER_NAMESPACE: &str = "istio-system";
/// Service account of the controller's own identity.
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "istiod";
/// The DNS name Istio's ztunnel verifies in the control plane's certificate by default.
pub const CONTROLLER_DNS_NAME: &str = "istiod.istio-system.svc";

/// How long a client may take to finish the TLS handshake before the connection is dropped, so
/// idle sockets cannot pile up.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive, so half-open connections of vanished nodes are noticed and their streams end.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Extracts the token of an `authorization: Bearer <token>` header.
pub(crate) fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Authenticates a call: the node name for a valid bearer token, else `Unauthenticated`.
pub(crate) fn authenticate(auth: &Authenticator, metadata: &MetadataMap) -> Result<String, Status> {
    let token = bearer_token(metadata).ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
    auth(token).ok_or_else(|| Status::unauthenticated("invalid bearer token"))
}

/// The controller's serving certificate and key (PEM), presented to every node agent.
#[derive(Clone)]
pub struct ServerTlsMaterial {
    /// Leaf-first certificate chain.
    pub cert_chain_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
    /// Roots clients verify the chain against (for their configuration and for tests).
    pub roots_pem: String,
}

impl std::fmt::Debug for ServerTlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTlsMaterial").finish_non_exhaustive()
    }
}

impl ServerTlsMaterial {
    /// Uses an already issued certificate (e.g. from Istio plug-in CA files).
    pub fn from_certificate(cert: &WorkloadCertificate) -> Self {
        let key = cert.private_key();
        ServerTlsMaterial {
            cert_chain_pem: cert.chain_pem(),
            key_pem: pem::encode(&pem::Pem::new("PRIVATE KEY", key.secret_der().to_vec())),
            roots_pem: cert.roots().to_pem(),
        }
    }

    /// Issues the controller's own serving certificate from its CA: SPIFFE id
    /// `spiffe://<td>/ns/istio-system/sa/istiod`, `istiod.istio-system.svc` plus `dns_names`, and
    /// `ips` (the addresses node agents dial), so clients verifying either form accept it.
    pub fn issue(ca: &InProcessCa, dns_names: &[&str], ips: &[IpAddr]) -> Result<Self, TlsMaterialError> {
        let id = controller_identity(ca.trust_domain())?;
        let mut names = vec![CONTROLLER_DNS_NAME];
        names.extend(dns_names.iter().copied().filter(|n| *n != CONTROLLER_DNS_NAME));
        Ok(Self::from_certificate(&ca.issue_server(&id, &names, ips)?))
    }

    /// The chain as DER, for callers that inspect it.
    pub fn chain_der(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        x509::certs_from_pem(self.cert_chain_pem.as_bytes()).unwrap_or_default()
    }
}

/// Why the controller's serving certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum TlsMaterialError {
    /// The CA's trust domain does not form a valid SPIFFE id.
    #[error("controller identity: {0}")]
    Identity(#[from] IdentityError),
    /// The CA refused or failed to issue.
    #[error("controller serving certificate: {0}")]
    Ca(#[from] CaError),
}

/// The controller's SPIFFE identity in `trust_domain` (Istio's istiod identity).
pub fn controller_identity(trust_domain: &str) -> Result<Identity, IdentityError> {
    Identity::new(trust_domain, CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT)
}

/// Why the gRPC listener stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The serving certificate or key was rejected.
    #[error("controller TLS configuration: {0}")]
    Tls(#[source] tonic::transport::Error),
    /// The server failed while running.
    #[error("controller gRPC server: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// Serves the delta ADS and CA services over TLS on `listener` until `shutdown` resolves; open
/// ADS streams end then, and node agents reconnect elsewhere or later, keeping their last config.
pub async fn serve(
    listener: TcpListener,
    tls: ServerTlsMaterial,
    ads: AdsServer,
    ca: CaServer,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().ok();
    let identity = TonicIdentity::from_pem(&tls.cert_chain_pem, &tls.key_pem);
    let tls_config = ServerTlsConfig::new().identity(identity).timeout(TLS_HANDSHAKE_TIMEOUT);
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    info!(addr = ?addr, "controller gRPC (ADS + CA) listening over TLS");
    let streams = ads.clone();
    let shutdown = async move {
        shutdown.await;
        info!("controller gRPC shutting down: closing ADS streams");
        streams.close_streams();
    };
    Server::builder()
        .tls_config(tls_config)
        .map_err(ServeError::Tls)?
        .http2_keepalive_interval(Some(H2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(H2_KEEPALIVE_TIMEOUT))
        .add_service(ads.into_service())
        .add_service(ca.into_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(ServeError::Serve)
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;
    use x509_parser::extensions::GeneralName;

    use super::*;

    fn md(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", MetadataValue::try_from(value).unwrap());
        m
    }

    #[test]
    fn bearer_token_is_read_case_insensitively_and_other_schemes_are_ignored() {
        assert_eq!(bearer_token(&md("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&md("bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&md("Basic abc")), None);
        assert_eq!(bearer_token(&md("Bearer ")), None);
        assert_eq!(bearer_token(&MetadataMap::new()), None);
    }

    #[test]
    fn serving_certificate_carries_spiffe_dns_and_ip_sans() {
        let ca = InProcessCa::new(crate::identity::CaConfig::new("cluster.local")).unwrap();
        let tls = ServerTlsMaterial::issue(&ca, &["controller.example"], &["127.0.0.1".parse().unwrap()]).unwrap();
        let chain = tls.chain_der();
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let names = &leaf.subject_alternative_name().unwrap().unwrap().value.general_names;
        let uris: Vec<&str> =
            names.iter().filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None }).collect();
        let dns: Vec<&str> =
            names.iter().filter_map(|n| if let GeneralName::DNSName(d) = n { Some(*d) } else { None }).collect();
        let ips: Vec<&[u8]> =
            names.iter().filter_map(|n| if let GeneralName::IPAddress(ip) = n { Some(*ip) } else { None }).collect();
        assert_eq!(uris, ["spiffe://cluster.local/ns/istio-system/sa/istiod"]);
        assert_eq!(dns, [CONTROLLER_DNS_NAME, "controller.example"]);
        assert_eq!(ips, [&[127u8, 0, 0, 1][..]]);
    }
}

/// A real controller listener on loopback (TLS, both services) and clients for it, shared by the
/// ADS and CA tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

    use super::*;
    use crate::identity::CaConfig;

    /// Tokens the test authenticator accepts: `token-<node>` authenticates `<node>`.
    pub fn authenticator() -> Authenticator {
        Arc::new(|token: &str| token.strip_prefix("token-").map(str::to_string))
    }

    /// An in-memory CA for `cluster.local`.
    pub fn test_ca() -> Arc<InProcessCa> {
        Arc::new(InProcessCa::new(CaConfig::new("cluster.local")).expect("test CA"))
    }

    /// A running controller listener; stops when dropped.
    pub struct TestServer {
        pub addr: SocketAddr,
        roots_pem: String,
        shutdown: Option<oneshot::Sender<()>>,
        task: Option<JoinHandle<Result<(), ServeError>>>,
    }

    impl TestServer {
        /// Serves `ads` and `ca` on a loopback port with a certificate from `issuer`.
        pub async fn start(issuer: &InProcessCa, ads: AdsServer, ca: CaServer) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let tls = ServerTlsMaterial::issue(issuer, &[], &[addr.ip()]).unwrap();
            let roots_pem = tls.roots_pem.clone();
            let (tx, rx) = oneshot::channel();
            let task = tokio::spawn(serve(listener, tls, ads, ca, async {
                let _ = rx.await;
            }));
            TestServer { addr, roots_pem, shutdown: Some(tx), task: Some(task) }
        }

        /// A TLS channel that verifies the server as Istio's ztunnel does (root + DNS name).
        pub async fn channel(&self) -> Channel {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&self.roots_pem))
                .domain_name(CONTROLLER_DNS_NAME);
            Endpoint::from_shared(format!("https://{}", self.addr))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .expect("connect to test controller")
        }

        /// Stops the server and waits for it.
        pub async fn stop(mut self) {
            if let Some(tx) = self.shutdown.take() {
                let _ = tx.send(());
            }
            if let Some(task) = self.task.take() {
                task.await.unwrap().unwrap();
            }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            if let Some(task) = self.task.take() {
                task.abort();
            }
        }
    }

    /// Adds `authorization: Bearer <token>` to a request.
    pub fn with_token<T>(mut req: tonic::Request<T>, token: Option<&str>) -> tonic::Request<T> {
        if let Some(token) = token {
            req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        req
    }
}
