//! 15001: connections the kernel programs captured from the pod's own apps. The original
//! destination comes from the kernel's table, keyed by what `accept()` shows. Mesh
//! workloads (and service VIPs backed by them) are reached in HBONE with the pod's own
//! identity; anything else is passed through as TCP from inside the pod.
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tracing::{warn, Instrument};
use ztunnel_common::HBONE_PORT;

use super::authz::Guarded;
use super::relay::{connection_span, labels, refuse, splice, ConnectionRecord, Direction, Metered, FLAG_CONNECT};
use super::{accept_loop, same_node, socket, ProxyContext};
use crate::hbone::{ConnectHeaders, DialError, HboneError, HboneStream, PoolKey};
use crate::identity::Identity;
use crate::metrics::Reporter;
use crate::redirect::OrigDstTable;
use crate::state::{Upstream, Workload};

/// Serves one outbound listener of a pod until the task is aborted.
pub async fn serve(ctx: ProxyContext, listener: TcpListener, orig: OrigDstTable) {
    let (limit, metrics) = (ctx.pod.limits.outbound.clone(), ctx.mesh.metrics.clone());
    // A refused connection's original destination is taken too, so a pod at its cap cannot
    // fill the node-wide kernel table and get other pods' entries evicted.
    let (forget, cookie) = (orig.clone(), ctx.pod.netns.cookie());
    let on_refused = move |peer: SocketAddr| {
        let _ = forget.take(cookie, peer);
    };
    accept_loop(listener, limit, metrics, "outbound", on_refused, move |stream: TcpStream, peer: SocketAddr| {
        let ctx = ctx.clone();
        let orig = orig.clone();
        async move {
            match orig.take(ctx.pod.netns.cookie(), peer) {
                Some(dst) => {
                    let span = tracing::debug_span!("outbound", pod = %ctx.pod.uid, src = %peer, %dst);
                    handle(&ctx, stream, peer, dst).instrument(span).await
                }
                // Someone connected to 15001 directly, or the kernel's entry was evicted:
                // there is no destination to serve, so the connection is closed (fail closed).
                None => {
                    ctx.mesh.metrics.original_destination_missing();
                    warn!(pod = %ctx.pod.uid, %peer, "no original destination; closing")
                }
            }
        }
    })
    .await
}

/// An outbound connection once its upstream is up.
enum Connected {
    Tcp(Metered<TcpStream>),
    Hbone(Metered<HboneStream>),
    /// Same-node fast path: the destination side's own metered app connection (boxed: it
    /// carries both sides' records, and this enum lives only until the copy starts).
    Local(Box<Metered<Metered<Guarded<TcpStream>>>>),
}

async fn handle(ctx: &ProxyContext, client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
    // Setting up is boxed: its state (labels, identities, the dial or HBONE handshake) is
    // freed once connected, so an idle connection's task keeps only the copy's state.
    let Some((client, upstream)) = Box::pin(connect(ctx, client, peer, dst)).await else {
        return;
    };
    match upstream {
        Connected::Tcp(up) => splice(client, up).await,
        Connected::Hbone(up) => splice(client, up).await,
        Connected::Local(up) => splice(client, *up).await,
    }
}

/// Resolves `dst` and connects to it; a connection that cannot be set up is refused here.
async fn connect(
    ctx: &ProxyContext,
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
) -> Option<(TcpStream, Connected)> {
    let rec = ConnectionRecord::new(ctx, Direction::Outbound, peer, dst);
    // Before the first state arrives every destination looks unknown (plain TCP, no
    // mTLS): refuse instead of sending in clear what the mesh would carry in HBONE.
    if !ctx.mesh.state.is_synced() {
        refuse(ctx, rec, client, super::authz::NOT_SYNCED.into());
        return None;
    }
    // One snapshot for both, dropped before connecting: a long connection must not keep an
    // old copy of the whole state alive.
    let (up, src_w) = {
        let snap = ctx.mesh.state.snapshot();
        let src_w = ctx.pod.workload(&snap);
        (snap.resolve_from(dst, src_w.as_deref()), src_w)
    };
    let Some(src_w) = src_w else {
        refuse(ctx, rec, client, super::authz::NO_WORKLOAD.into());
        return None;
    };
    let Some(up) = up else {
        refuse(ctx, rec, client, format!("service {dst} has no endpoints (or its waypoint has none)"));
        return None;
    };
    if up.is_hbone() {
        return hbone(ctx, client, rec, &up, &src_w).await;
    }
    let l = labels(Reporter::Source, &rec, Some(&src_w), up.workload.as_deref(), up.service.as_deref());
    match socket::dial(&ctx.pod.netns, up.addr, None).await {
        Ok(upstream) => Some((client, Connected::Tcp(Metered::new(upstream, ctx, rec, l)))),
        Err(e) => {
            ctx.mesh.metrics.connection_failed(&l, FLAG_CONNECT);
            refuse(ctx, rec, client, format!("connect {}: {e}", up.addr));
            None
        }
    }
}

async fn hbone(
    ctx: &ProxyContext,
    client: TcpStream,
    mut rec: ConnectionRecord,
    up: &Upstream,
    src_w: &Workload,
) -> Option<(TcpStream, Connected)> {
    let w = up.workload.as_ref().expect("hbone upstream has a workload");
    let td = if w.trust_domain.is_empty() { &ctx.mesh.trust_domain } else { &w.trust_domain };
    let (Some(src_id), Ok(dst_id), Some(src_ip)) = (
        ctx.pod.identity(&ctx.mesh.trust_domain),
        Identity::new(td, &w.namespace, &w.service_account),
        ctx.pod.ip_like(up.addr.ip()),
    ) else {
        refuse(ctx, rec, client, "cannot form HBONE identities".into());
        return None;
    };
    rec.protocol = "HBONE";
    rec.src_identity = Some(src_id.to_string());
    rec.dst_identity = Some(dst_id.to_string());
    // The server may prove the workload's identity or one the service lists as its own.
    let dst_alt_identities =
        up.service.iter().flat_map(|s| &s.subject_alt_names).filter_map(|san| san.parse::<Identity>().ok()).collect();
    let key = PoolKey {
        src_identity: src_id,
        dst_identity: dst_id,
        dst_alt_identities,
        dst: up.hbone_dst.unwrap_or(SocketAddr::new(up.addr.ip(), HBONE_PORT)),
        src_ip,
    };
    let span = connection_span(ctx, &rec, None);
    let headers = ConnectHeaders {
        forwarded_for: Some(SocketAddr::new(src_ip, rec.src.port())),
        forwarded_host: up.service.as_ref().map(|s| s.hostname.clone()),
        baggage: Some(baggage(src_w)),
        traceparent: Some(span.as_ref().map(|s| s.traceparent()).unwrap_or_else(traceparent)),
        extra: Default::default(),
    };
    let l = labels(Reporter::Source, &rec, Some(src_w), Some(w), up.service.as_deref());
    if let Some(dst_pod) = same_node::local_destination(ctx, &key) {
        let parent = headers.traceparent.as_deref();
        return match same_node::connect(ctx, dst_pod, &key, rec.src.port(), up.addr, parent).await {
            Ok(app) => Some((client, Connected::Local(Box::new(Metered::new(app, ctx, rec, l).with_span(span))))),
            Err(e) => {
                ctx.mesh.metrics.connection_failed(&l, FLAG_CONNECT);
                refuse(ctx, rec, client, format!("same-node to {}: {e}", up.addr));
                None
            }
        };
    }
    match ctx.mesh.pool.connect(key, up.addr, headers).await {
        Ok(tunnel) => Some((client, Connected::Hbone(Metered::new(tunnel, ctx, rec, l).with_span(span)))),
        Err(e) => {
            ctx.mesh.metrics.connection_failed(&l, FLAG_CONNECT);
            if let HboneError::Dial(d) = &e {
                if let DialError::Tls { reason, .. } = d.as_ref() {
                    ctx.mesh.metrics.tls_handshake_failed(reason.as_str());
                }
            }
            refuse(ctx, rec, client, format!("HBONE to {}: {e}", up.addr));
            None
        }
    }
}

/// W3C baggage describing the source workload with Istio's keys, in Istio's order, each
/// left out when empty: cluster, namespace, `k8s.<workload type>.name`, canonical service
/// and revision.
pub fn baggage(w: &Workload) -> String {
    let kind = if w.workload_type.is_empty() { "pod" } else { w.workload_type.as_str() };
    let name = if w.workload_name.is_empty() { &w.name } else { &w.workload_name };
    let kind_key = format!("k8s.{kind}.name");
    let pairs = [
        ("k8s.cluster.name", w.cluster_id.as_str()),
        ("k8s.namespace.name", w.namespace.as_str()),
        (kind_key.as_str(), name.as_str()),
        ("service.name", w.canonical_name.as_str()),
        ("service.version", w.canonical_revision.as_str()),
    ];
    pairs.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// A fresh W3C traceparent (random trace and span ids, not sampled).
fn traceparent() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 24];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    let hex = |s: &[u8]| s.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("00-{}-{}-00", hex(&b[..16]), hex(&b[16..]))
}
