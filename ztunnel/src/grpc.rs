//! Reaching the control plane: a gRPC channel over TLS (with the configured roots) and the
//! bearer token, shared by the xDS client and the CA client so both authenticate the same
//! way Istio's ztunnel does (`XDS_ROOT_CA`/`CA_ROOT_CA`, `AUTH_TOKEN`).
use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A control-plane server and how to trust and authenticate to it.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneEndpoint {
    /// `https://host:port` (`http://` only for plaintext test servers).
    pub address: String,
    /// PEM roots that sign the server's certificate.
    pub root_pem: Option<Vec<u8>>,
    /// Name checked against the server's certificate; defaults to the address's host.
    pub server_name: Option<String>,
    /// File holding the bearer token, re-read on every connect so rotation is picked up.
    pub token_path: Option<PathBuf>,
}

/// Why the control plane could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("address {0:?}: {1}")]
    Address(String, tonic::transport::Error),
    #[error("connecting to {0}: {1}")]
    Connect(String, tonic::transport::Error),
    #[error("reading token {0}: {1}")]
    Token(PathBuf, String),
}

impl ControlPlaneEndpoint {
    /// Connects a channel (TLS for `https://`).
    pub async fn connect(&self) -> Result<Channel, GrpcError> {
        let mut ep = Endpoint::from_shared(self.address.clone())
            .map_err(|e| GrpcError::Address(self.address.clone(), e))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if self.address.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(pem) = &self.root_pem {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(name) = &self.server_name {
                tls = tls.domain_name(name.clone());
            }
            ep = ep.tls_config(tls).map_err(|e| GrpcError::Address(self.address.clone(), e))?;
        }
        ep.connect().await.map_err(|e| GrpcError::Connect(self.address.clone(), e))
    }

    /// The `authorization` header value, if a token is configured.
    pub fn bearer(&self) -> Result<Option<MetadataValue<Ascii>>, GrpcError> {
        let Some(path) = &self.token_path else { return Ok(None) };
        let token = std::fs::read_to_string(path).map_err(|e| GrpcError::Token(path.clone(), e.to_string()))?;
        format!("Bearer {}", token.trim())
            .parse()
            .map(Some)
            .map_err(|_| GrpcError::Token(path.clone(), "token is not printable ASCII".into()))
    }
}

/// The name this node gives the control plane: `configured` (`NODE_NAME`), or else the
/// kernel's hostname, which is the node name Kubernetes uses by default.
pub fn node_name(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// An interceptor adding `authorization: <bearer>` to every call.
pub fn with_bearer(
    bearer: Option<MetadataValue<Ascii>>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut req: tonic::Request<()>| {
        if let Some(t) = &bearer {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}
