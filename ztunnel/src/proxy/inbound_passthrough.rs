//! 15006: plaintext TCP steered here by the inbound `sk_lookup` program. The accepted
//! socket's local address is the original destination; the app is dialled from
//! 127.0.0.6 inside the pod so the steering program lets it through.
use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::socket::INBOUND_SOURCE_V4;
use super::{accept_loop, forward, Direction, ProxyContext};

/// Serves the pod's passthrough listener until the task is aborted.
pub async fn serve(ctx: ProxyContext, listener: TcpListener) {
    accept_loop(listener, move |stream: TcpStream, peer: SocketAddr| {
        let ctx = ctx.clone();
        async move {
            let dst = match stream.local_addr() {
                Ok(a) => canonical(a),
                Err(e) => return warn!(error = %e, "no local address"),
            };
            let bind = dst.is_ipv4().then_some(IpAddr::V4(INBOUND_SOURCE_V4));
            forward(&ctx, Direction::InboundPassthrough, stream, canonical(peer), dst, bind).await
        }
    })
    .await
}

/// A dual-stack listener reports IPv4 peers as `::ffff:a.b.c.d`; show them as IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}
