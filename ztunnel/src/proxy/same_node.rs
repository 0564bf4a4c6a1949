//! The same-node fast path. When the HBONE target of an outbound connection is another pod
//! this agent serves, HBONE would have the agent talk to itself: a TLS handshake between two
//! certificates it holds, h2 framing, and two more TCP legs. Instead the outbound side hands
//! the connection straight to the destination pod's inbound admission ([`inbound::admit`]),
//! which makes the same checks (target is the pod's, not a proxy port, policy with the
//! source's identity) and reports the same records and metrics as over HBONE.
//!
//! Nothing is taken on trust that TLS would have proven: the destination pod's identity
//! must be one the source would accept from the handshake, and both pods' certificates
//! must be ones the agent holds (fetched as the handshake would), so a pod whose
//! certificate cannot be issued is refused here as it would be there.
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use ztunnel_common::HBONE_PORT;

use super::authz::Guarded;
use super::relay::Metered;
use super::{inbound, PodContext, ProxyContext};
use crate::hbone::{ConnectRejection, PoolKey};

/// Why the fast path could not carry a connection (it is then refused, as an HBONE
/// handshake or CONNECT failure would be; it never falls back to plain TCP).
#[derive(Debug, thiserror::Error)]
pub enum SameNodeError {
    #[error("destination pod has no valid identity")]
    NoIdentity,
    #[error("destination pod is {found}, not the expected {expected}")]
    IdentityMismatch { found: String, expected: String },
    #[error("certificate for {identity}: {reason}")]
    Certificate { identity: String, reason: String },
    #[error("{0}")]
    Rejected(#[from] ConnectRejection),
}

/// The destination pod when the connection for `key` can stay inside the agent: the fast
/// path is on, the HBONE endpoint is a pod's own 15008 (not a waypoint or gateway
/// elsewhere) and that pod is enrolled here.
pub fn local_destination(ctx: &ProxyContext, key: &PoolKey) -> Option<Arc<PodContext>> {
    if !ctx.mesh.same_node_fast_path || key.dst.port() != HBONE_PORT {
        return None;
    }
    ctx.mesh.local_pods.get(key.dst.ip())
}

/// Connects to `target` in `dst_pod` as the source `key.src_identity` from
/// `key.src_ip:src_port`; the result is the destination side's metered app connection.
pub async fn connect(
    ctx: &ProxyContext,
    dst_pod: Arc<PodContext>,
    key: &PoolKey,
    src_port: u16,
    target: SocketAddr,
    traceparent: Option<&str>,
) -> Result<Metered<Guarded<TcpStream>>, SameNodeError> {
    let found = dst_pod.identity(&ctx.mesh.trust_domain).ok_or(SameNodeError::NoIdentity)?;
    if found != key.dst_identity && !key.dst_alt_identities.contains(&found) {
        return Err(SameNodeError::IdentityMismatch {
            found: found.to_string(),
            expected: key.dst_identity.to_string(),
        });
    }
    for id in [&key.src_identity, &found] {
        if let Err(e) = ctx.mesh.certs.fetch(id).await {
            return Err(SameNodeError::Certificate { identity: id.to_string(), reason: e.to_string() });
        }
    }
    let dst_ctx = ProxyContext { pod: dst_pod, mesh: ctx.mesh.clone() };
    let up =
        inbound::admit(&dst_ctx, SocketAddr::new(key.src_ip, src_port), &key.src_identity, target, traceparent).await?;
    ctx.mesh.metrics.same_node_connection();
    Ok(up)
}
