//! 15001: connections the kernel programs captured from the pod's own apps. The original
//! destination comes from the kernel's table, keyed by what `accept()` shows.
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::{accept_loop, forward, Direction, ProxyContext};
use crate::redirect::OrigDstTable;

/// Serves one outbound listener of a pod until the task is aborted.
pub async fn serve(ctx: ProxyContext, listener: TcpListener, orig: OrigDstTable) {
    accept_loop(listener, move |stream: TcpStream, peer: SocketAddr| {
        let ctx = ctx.clone();
        let orig = orig.clone();
        async move {
            match orig.take(ctx.pod.netns.cookie(), peer) {
                Some(dst) => forward(&ctx, Direction::Outbound, stream, peer, dst, None).await,
                // Someone connected to 15001 directly: there is no destination to serve.
                None => warn!(pod = %ctx.pod.uid, %peer, "no original destination; closing"),
            }
        }
    })
    .await
}
