//! Kubernetes `Gateway` resources (`gateway.networking.k8s.io`) at the ingress: the
//! Gateways of class `istio` — Istio's ingress class — in the routes directory add their
//! listeners' ports to those the gateway listens on, and the routes attached to a listener
//! (HTTPRoute, GRPCRoute, TCPRoute) decide the requests it takes. Kept apart from the Istio
//! `Gateway` path in `mod.rs`, which must keep working unchanged, because a listener is
//! chosen differently (port, then SNI or Host against the listener's one hostname) and its
//! certificate comes from `certificateRefs`.
//!
//! Served: `HTTP`; `HTTPS` with TLS terminated (`mode: Terminate`, the default) by the first
//! `certificateRefs` entry, a `kubernetes.io/tls` Secret of the Gateway's namespace (another
//! namespace's when a ReferenceGrant allows it); `TCP` with a TCPRoute. `TLS` listeners
//! carry TLSRoutes, which are not implemented: their ports are not opened.
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{peek_client_hello, tunnel, Edge, Hello, HELLO_TIMEOUT};
use crate::routing::gateway_api::types::Listener;
use crate::routing::ingress::Credential;
use crate::waypoint::routes::RouteTable;

/// The Gateway class an ingress gateway serves.
pub const INGRESS_CLASS: &str = "istio";

/// One listener of a Kubernetes Gateway this ingress serves.
#[derive(Debug, Clone)]
pub(super) struct GatewayListener {
    pub namespace: String,
    pub gateway: String,
    pub listener: Listener,
}

impl GatewayListener {
    fn port(&self) -> Option<u16> {
        u16::try_from(self.listener.port).ok().filter(|p| *p > 0)
    }

    fn name(&self) -> (String, String) {
        (self.namespace.clone(), self.gateway.clone())
    }

    /// How precisely the listener's hostname matches `sni` (`None`: not at all): exact,
    /// then the longest wildcard, then a listener without hostname.
    fn sni_score(&self, sni: &str) -> Option<(u8, usize)> {
        match self.listener.hostname.as_deref().map(str::to_ascii_lowercase) {
            None => Some((0, 0)),
            Some(h) if h == sni.to_ascii_lowercase() => Some((2, h.len())),
            Some(h) => h
                .strip_prefix('*')
                .filter(|suffix| sni.to_ascii_lowercase().ends_with(suffix) && sni.len() > suffix.len())
                .map(|_| (1, h.len())),
        }
    }
}

/// Why an HTTPS listener has no certificate (its connections are closed, others go on).
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("listener {0}: HTTPS needs tls.certificateRefs")]
    NoCertificateRef(String),
    #[error("listener {0}: certificateRefs kind {1} is not supported (core Secret only)")]
    UnsupportedRef(String, String),
    #[error("listener {0}: Secret {1} is in another namespace and no ReferenceGrant allows it")]
    NotGranted(String, String),
    #[error("listener {0}: tls mode {1} is not supported on HTTPS (Terminate only)")]
    Mode(String, String),
}

/// The listeners of the Gateways of class [`INGRESS_CLASS`] with a protocol served here
/// (`HTTP`, `HTTPS`, `TCP`).
pub(super) fn listeners(table: &RouteTable) -> Vec<GatewayListener> {
    let mut out = vec![];
    for ((ns, name), g) in &table.gateway_api.cluster.gateways {
        if g.class != INGRESS_CLASS {
            continue;
        }
        for l in g.listeners.iter().filter(|l| matches!(l.protocol.as_str(), "HTTP" | "HTTPS" | "TCP")) {
            let gl = GatewayListener { namespace: ns.clone(), gateway: name.clone(), listener: l.clone() };
            if gl.port().is_some() {
                out.push(gl);
            }
        }
    }
    out
}

/// The listeners on `port`.
pub(super) fn on_port(table: &RouteTable, port: u16) -> Vec<GatewayListener> {
    listeners(table).into_iter().filter(|l| l.port() == Some(port)).collect()
}

/// The ports the listeners name.
pub(super) fn ports(table: &RouteTable) -> impl Iterator<Item = u16> {
    listeners(table).into_iter().filter_map(|l| l.port())
}

/// The Gateways of the plain-HTTP listeners among `ls`, for the request path.
pub(super) fn http_gateways(ls: &[GatewayListener]) -> Vec<(String, String)> {
    let mut out: Vec<_> = ls.iter().filter(|l| l.listener.protocol == "HTTP").map(GatewayListener::name).collect();
    out.dedup();
    out
}

/// The certificate of an HTTPS listener: its first `certificateRefs` entry, a Secret.
fn credential(table: &RouteTable, l: &GatewayListener) -> Result<Credential, ListenerError> {
    let name = format!("{}/{}/{}", l.namespace, l.gateway, l.listener.name);
    let tls = l.listener.tls.as_ref();
    if let Some(mode) = tls.and_then(|t| t.mode.as_deref()).filter(|m| *m != "Terminate") {
        return Err(ListenerError::Mode(name, mode.to_string()));
    }
    let r =
        tls.and_then(|t| t.certificate_refs.first()).ok_or_else(|| ListenerError::NoCertificateRef(name.clone()))?;
    let (group, kind) = (r.group.as_deref().unwrap_or(""), r.kind.as_deref().unwrap_or("Secret"));
    if !group.is_empty() || kind != "Secret" {
        return Err(ListenerError::UnsupportedRef(name, format!("{group}/{kind}")));
    }
    let ns = r.namespace.as_deref().unwrap_or(&l.namespace);
    if ns != l.namespace && !table.gateway_api.grants_secret(&l.namespace, ns, &r.name) {
        return Err(ListenerError::NotGranted(name, format!("{ns}/{}", r.name)));
    }
    Ok(Credential::Secret(format!("{ns}/{}", r.name)))
}

/// A connection on a port only Kubernetes Gateway listeners (`ls`, not empty) use: TCP
/// relayed by the TCPRoute, HTTP served, HTTPS terminated with the certificate of the
/// listener the SNI picks, then served.
pub(super) async fn connection(
    edge: Arc<Edge>,
    port: u16,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    ls: Vec<GatewayListener>,
) {
    let table = edge.shared.routes.table();
    let make = |gateway_api: Vec<(String, String)>| tunnel(&edge, peer, local, vec![], gateway_api);
    if let Some(l) = ls.iter().find(|l| l.listener.protocol == "TCP") {
        let found = table.gateway_api.routes.for_gateway(&l.namespace, &l.gateway, port, "");
        let Some(targets) = found.and_then(|p| p.tcp_targets(port)).map(<[_]>::to_vec) else {
            return debug!(port, "no TCPRoute on this listener");
        };
        let t = make(vec![l.name()]);
        return crate::waypoint::tcp::relay_to(&t, &targets, &table, stream).await;
    }
    let plain = http_gateways(&ls);
    let secure: Vec<&GatewayListener> = ls.iter().filter(|l| l.listener.protocol == "HTTPS").collect();
    if secure.is_empty() {
        return crate::waypoint::http::serve(make(plain), stream).await;
    }
    let sni = match peek_client_hello(&stream, HELLO_TIMEOUT).await {
        Ok(Hello::Tls(sni)) => sni.unwrap_or_default(),
        Ok(Hello::NotTls) if !plain.is_empty() => return crate::waypoint::http::serve(make(plain), stream).await,
        Ok(Hello::NotTls) => return debug!("not TLS on a TLS port"),
        Err(e) => return debug!(error = %e, "no ClientHello"),
    };
    let Some(chosen) = secure.iter().filter_map(|l| Some((l.sni_score(&sni)?, *l))).max_by_key(|(s, _)| *s) else {
        return debug!(sni, "no Gateway listener for this SNI");
    };
    let l = chosen.1;
    let config = match credential(&table, l)
        .map_err(|e| e.to_string())
        .and_then(|cred| edge.tls.server_config(&cred, &table.ingress.secrets).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => return warn!(error = %e, "no certificate for a Gateway listener"),
    };
    let tls = match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
        Ok(t) => t,
        Err(e) => {
            edge.shared.metrics.tls_handshake_failed(crate::tls::RejectReason::from_io(&e).as_str());
            return debug!(error = %e, "ingress TLS handshake failed");
        }
    };
    crate::waypoint::http::serve(make(vec![l.name()]), tls).await
}
