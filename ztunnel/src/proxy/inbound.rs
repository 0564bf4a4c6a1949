//! 15008: the pod's HBONE listener, served directly (never redirected). Terminates mTLS
//! with the pod's own certificate (peers must be in our trust domain), then for each
//! CONNECT: the authority must be this pod, policy must allow the peer, and the app is
//! dialled inside the pod from the peer's address (see `keep_source`).
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn, Instrument};

use super::authz::{check, watch, Guarded};
use super::relay::{
    connection_span, destination_labels, finish, ConnectionRecord, Direction, Metered, FLAG_CONNECT, FLAG_DENY,
};
use super::{accept_loop, canonical, ProxyContext};
use crate::hbone::{serve_connection_until, ConnectHandler, ConnectRejection, ConnectRequest, H2Config};
use crate::identity::Identity;
use crate::policy::{ConnectionFacts, Decision};
use crate::tls::RejectReason;

/// Longest a TLS handshake on 15008 may take.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the pod's HBONE listener until the task is aborted.
pub async fn serve(ctx: ProxyContext, listener: TcpListener) {
    let (limit, metrics) = (ctx.pod.limits.inbound_hbone.clone(), ctx.mesh.metrics.clone());
    accept_loop(
        listener,
        limit,
        metrics,
        "inbound",
        |_| {},
        move |stream: TcpStream, peer: SocketAddr| {
            let ctx = ctx.clone();
            let span = tracing::debug_span!("inbound", pod = %ctx.pod.uid, peer = %canonical(peer));
            async move { connection(ctx, stream, canonical(peer)).await }.instrument(span)
        },
    )
    .await
}

async fn connection(ctx: ProxyContext, stream: TcpStream, peer: SocketAddr) {
    let Some(id) = ctx.pod.identity(&ctx.mesh.trust_domain) else {
        return warn!("pod has no valid identity; refusing HBONE");
    };
    let cfg = match ctx.mesh.certs.fetch(&id).await {
        Ok(cert) => match ctx.pod.server_tls.get(&cert) {
            Ok(c) => c,
            Err(e) => return warn!(error = %e, "cannot build TLS config"),
        },
        Err(e) => return warn!(error = %e, %id, "no certificate for pod"),
    };
    // A peer that connects and never finishes the handshake must not hold a task forever.
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(cfg).accept(stream));
    let tls = match handshake
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")))
    {
        Ok(t) => t,
        Err(e) => {
            let reason = RejectReason::from_io(&e);
            ctx.mesh.metrics.tls_handshake_failed(reason.as_str());
            return warn!(reason = reason.as_str(), error = %e, "HBONE TLS handshake refused");
        }
    };
    let handler = Arc::new(Inbound { ctx: ctx.clone(), peer });
    let mut draining = ctx.mesh.draining.clone();
    let drain = async move {
        let _ = draining.wait_for(|d| *d).await;
    };
    if let Err(e) = serve_connection_until(tls, handler, &H2Config::default(), drain).await {
        debug!(error = %e, "HBONE connection ended");
    }
}

struct Inbound {
    ctx: ProxyContext,
    peer: SocketAddr,
}

impl ConnectHandler for Inbound {
    type Upstream = Metered<Guarded<TcpStream>>;

    async fn connect(&self, req: ConnectRequest) -> Result<Self::Upstream, ConnectRejection> {
        // The TCP peer, never the client-supplied `forwarded` header: policy on source IPs
        // must not be spoofable by whoever holds a mesh certificate.
        admit(&self.ctx, self.peer, &req.peer, req.authority, req.traceparent.as_deref()).await
    }
}

/// Admits one tunnelled connection to this pod from `src`, proven to be `peer`: the target
/// must be an address of this pod and not a proxy port, policy must allow it, and the app
/// is dialled (see `keep_source`). The HBONE server and the same-node fast path both come
/// through here, so neither can skip a check the other makes.
pub async fn admit(
    ctx: &ProxyContext,
    src: SocketAddr,
    peer: &Identity,
    dst: SocketAddr,
    traceparent: Option<&str>,
) -> Result<Metered<Guarded<TcpStream>>, ConnectRejection> {
    let mut rec = ConnectionRecord::new(ctx, Direction::Inbound, src, dst);
    rec.protocol = "HBONE";
    rec.src_identity = Some(peer.to_string());
    rec.dst_identity = ctx.pod.identity(&ctx.mesh.trust_domain).map(|i| i.to_string());
    let refuse = |mut rec: ConnectionRecord, r: ConnectRejection| {
        rec.error = Some(r.to_string());
        finish(ctx, rec);
        Err(r)
    };
    if !ctx.pod.ips.contains(&dst.ip()) {
        return refuse(rec, ConnectRejection::BadRequest(format!("{dst} is not an address of this pod")));
    }
    if super::is_proxy_port(dst.port()) {
        return refuse(rec, ConnectRejection::BadRequest(format!("{dst} is a proxy port")));
    }
    let l = destination_labels(ctx, &rec, src.ip());
    let facts = ConnectionFacts { source_identity: Some(peer.clone()), source_ip: src.ip(), destination: dst };
    if let Decision::Deny(reason) = check(ctx, &facts, "inbound") {
        ctx.mesh.metrics.connection_failed(&l, FLAG_DENY);
        return refuse(rec, ConnectRejection::Denied(reason));
    }
    let upstream = match super::keep_source::dial_app(ctx, dst, src.ip()).await {
        Ok(u) => u,
        Err(e) => {
            ctx.mesh.metrics.connection_failed(&l, FLAG_CONNECT);
            return refuse(rec, ConnectRejection::UpstreamFailed(format!("{dst}: {e}")));
        }
    };
    let guard = watch(ctx, facts, "inbound");
    let span = connection_span(ctx, &rec, traceparent);
    Ok(Metered::new(Guarded { inner: upstream, watch: guard }, ctx, rec, l).with_span(span))
}
