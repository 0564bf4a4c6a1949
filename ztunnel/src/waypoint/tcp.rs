//! Raw TCP through the L7 proxy: a waypoint tunnel to a port that the service's
//! VirtualService routes with `tcp` rules only (or that a TCPRoute attached to the service
//! routes), or an ingress connection passed through by SNI (`tls` rules) or taken by a
//! Gateway's TCP listener, is relayed whole to one endpoint chosen by the rule's weights.
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

use super::http::{Front, Tunnel};
use super::lb::RequestView;
use crate::hbone::ConnectHeaders;
use crate::routing::WeightedTarget;

/// Relays a mesh tunnel to the destination its service's TCP rule picks (a TCPRoute
/// attached to the service before a VirtualService's `tcp` rule).
pub(super) async fn relay<S: AsyncRead + AsyncWrite + Unpin>(t: Arc<Tunnel>, stream: S) {
    let table = t.shared.routes.table();
    let Front::Mesh { service, peer } = &t.front else { return };
    let waypoint = (t.shared.name.0.as_str(), t.shared.name.1.as_str());
    let route = table.mesh_route(service, t.vip.port(), Some(peer.namespace()), waypoint);
    let Some(targets) = route.and_then(|r| r.tcp_targets(t.vip.port())) else {
        return debug!("no TCP route any more");
    };
    relay_to(&t, targets, &table, stream).await
}

/// Relays `stream` to one of `targets`, picked by weight.
pub(crate) async fn relay_to<S: AsyncRead + AsyncWrite + Unpin>(
    t: &Tunnel,
    targets: &[WeightedTarget],
    table: &std::sync::Arc<super::routes::RouteTable>,
    mut stream: S,
) {
    let total: u64 = targets.iter().map(|(_, w)| u64::from(*w)).sum();
    let mut at = fastrand::u64(..total.max(1));
    let Some((dest, _)) = targets.iter().find(|(_, w)| {
        let hit = at < u64::from(*w);
        at = at.saturating_sub(u64::from(*w));
        hit
    }) else {
        return;
    };
    let snap = t.shared.state.snapshot();
    let Some(svc) = snap.service_by_host(&dest.host, t.home_namespace()) else {
        return info!(host = %dest.host, "TCP route to an unknown service");
    };
    let subset = dest.subset.as_deref().and_then(|s| Some((s, table.subset_labels(&dest.host, s)?)));
    let port = dest.port.as_ref().map(|p| p.number as u16).unwrap_or_else(|| t.default_port(&svc));
    // The DestinationRule's policy holds for TCP too: its load balancer, outlier state and
    // `tcp.maxConnections` (over it, the connection is closed, as Envoy does).
    let cluster = t.shared.traffic.cluster((&snap, table), &dest.host, &svc, port, t.vip.ip(), subset, t.local_ip);
    let _connection = match cluster.breaker.connection() {
        Ok(p) => p,
        Err(overflow) => return info!(host = %dest.host, %overflow, "TCP route over its connection limit"),
    };
    let headers_seen = http::HeaderMap::new();
    let view = RequestView { headers: &headers_seen, path: "", source: t.peer_addr, target: None };
    let Some(chosen) = cluster.pick(&view) else {
        return info!(host = %dest.host, "TCP route has no endpoint");
    };
    let ep = chosen.endpoint.clone();
    let headers = ConnectHeaders { forwarded_for: Some(t.peer_addr), ..Default::default() };
    let mut up = match t.shared.upstreams.dial(&ep, t.local_ip, headers).await {
        Ok(u) => u,
        Err(e) => {
            cluster.record(ep.addr, super::outlier::Outcome::ConnectFailure);
            return info!(error = %e, "TCP route upstream failed");
        }
    };
    let result = crate::hbone::copy_bidirectional(&mut stream, &mut up).await;
    debug!(upstream = %ep.addr, ?result, "TCP route finished");
}
