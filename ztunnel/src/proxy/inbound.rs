//! 15008: the pod's HBONE listener. It is served directly (never redirected). Until the
//! HBONE server is wired in, connections are accepted and closed with a log line.
use tokio::net::TcpListener;
use tracing::info;

use super::ProxyContext;

/// Serves the pod's HBONE listener until the task is aborted.
pub async fn serve(ctx: ProxyContext, listener: TcpListener) {
    loop {
        if let Ok((_stream, peer)) = listener.accept().await {
            info!(pod = %ctx.pod.uid, %peer, "HBONE connection refused: not enabled on this node");
        }
    }
}
