//! 15006: plaintext TCP steered here by the inbound `sk_lookup` program. The accepted
//! socket's local address is the original destination. Policy applies (no identity:
//! plaintext); a denied connection is reset. The app is dialled inside the pod from the
//! client's address, registered so the steering program lets it through (`keep_source`).
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tracing::{warn, Instrument};

use super::authz::{check, watch, Guarded};
use super::relay::{destination_labels, refuse, splice, ConnectionRecord, Direction, Metered, FLAG_CONNECT, FLAG_DENY};
use super::{accept_loop, canonical, ProxyContext};
use crate::policy::ConnectionFacts;

/// Serves the pod's passthrough listener until the task is aborted.
pub async fn serve(ctx: ProxyContext, listener: TcpListener) {
    let (limit, metrics) = (ctx.pod.limits.inbound_passthrough.clone(), ctx.mesh.metrics.clone());
    accept_loop(
        listener,
        limit,
        metrics,
        "inbound_passthrough",
        |_| {},
        move |stream: TcpStream, peer: SocketAddr| {
            let ctx = ctx.clone();
            async move {
                let dst = match stream.local_addr() {
                    Ok(a) => canonical(a),
                    Err(e) => return warn!(error = %e, "no local address"),
                };
                let peer = canonical(peer);
                let span = tracing::debug_span!("inbound_passthrough", pod = %ctx.pod.uid, src = %peer, %dst);
                handle(&ctx, stream, peer, dst).instrument(span).await
            }
        },
    )
    .await
}

async fn handle(ctx: &ProxyContext, client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
    // Setting up is boxed so an idle connection's task keeps only the copy's state.
    if let Some((client, upstream)) = Box::pin(connect(ctx, client, peer, dst)).await {
        splice(client, upstream).await
    }
}

/// Checks policy and dials the app; a connection that cannot be set up is refused here.
async fn connect(
    ctx: &ProxyContext,
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
) -> Option<(TcpStream, Metered<Guarded<TcpStream>>)> {
    let rec = ConnectionRecord::new(ctx, Direction::InboundPassthrough, peer, dst);
    if super::is_proxy_port(dst.port()) {
        refuse(ctx, rec, client, format!("{dst} is a proxy port; refusing the loop"));
        return None;
    }
    let l = destination_labels(ctx, &rec, peer.ip());
    let facts = ConnectionFacts { source_identity: None, source_ip: peer.ip(), destination: dst };
    if let crate::policy::Decision::Deny(reason) = check(ctx, &facts, "inbound_passthrough") {
        ctx.mesh.metrics.connection_failed(&l, FLAG_DENY);
        refuse(ctx, rec, client, reason);
        return None;
    }
    match super::keep_source::dial_app(ctx, dst, peer.ip()).await {
        Ok(upstream) => {
            let upstream = Guarded { inner: upstream, watch: watch(ctx, facts, "inbound_passthrough") };
            Some((client, Metered::new(upstream, ctx, rec, l)))
        }
        Err(e) => {
            ctx.mesh.metrics.connection_failed(&l, FLAG_CONNECT);
            refuse(ctx, rec, client, format!("connect {dst}: {e}"));
            None
        }
    }
}
