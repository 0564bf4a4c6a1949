//! The per-pod data path, split by direction like Istio's ztunnel:
//! `outbound` (15001, captured connects from the pod), `inbound_passthrough` (15006,
//! plaintext arriving for the pod). Both end in [`forward`], which dials from inside the
//! pod's netns and copies bytes; HBONE (15008) plugs in beside them.
pub mod inbound;
pub mod inbound_passthrough;
pub mod outbound;
pub mod socket;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tracing::{info, warn, Instrument};

use crate::netns::InpodNetns;

/// Which listener a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    InboundPassthrough,
}

/// The pod a proxy instance serves, passed down by the node agent.
#[derive(Debug)]
pub struct PodContext {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub netns: InpodNetns,
}

/// One finished proxied connection: the access-log line, also published to subscribers
/// (tests, the admin API) so behaviour is observable without scraping logs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionRecord {
    pub direction: Direction,
    pub pod: String,
    pub src: SocketAddr,
    /// The original destination (for outbound, recovered from the kernel programs).
    pub dst: SocketAddr,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
    pub error: Option<String>,
}

/// Shared by all of a pod's listeners.
#[derive(Debug, Clone)]
pub struct ProxyContext {
    pub pod: Arc<PodContext>,
    pub events: broadcast::Sender<ConnectionRecord>,
}

/// Dials `dst` from inside the pod (optionally from `bind`), then copies bytes both ways
/// with half-close, and logs one record.
pub async fn forward(
    ctx: &ProxyContext,
    direction: Direction,
    mut client: TcpStream,
    src: SocketAddr,
    dst: SocketAddr,
    bind: Option<IpAddr>,
) {
    let span = tracing::info_span!("conn", ?direction, pod = %ctx.pod.uid, %src, %dst);
    async move {
        let start = Instant::now();
        let mut rec = ConnectionRecord {
            direction,
            pod: ctx.pod.uid.clone(),
            src,
            dst,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0,
            error: None,
        };
        match dial(&ctx.pod.netns, dst, bind).await {
            Ok(mut upstream) => match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                Ok((to_up, to_client)) => {
                    rec.bytes_sent = to_up;
                    rec.bytes_received = to_client;
                }
                Err(e) => rec.error = Some(format!("copy: {e}")),
            },
            Err(e) => rec.error = Some(format!("connect {dst}: {e}")),
        }
        rec.duration_ms = start.elapsed().as_millis() as u64;
        log_record(&rec);
        let _ = ctx.events.send(rec);
    }
    .instrument(span)
    .await
}

async fn dial(netns: &InpodNetns, dst: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let sock = socket::upstream_socket(netns, dst, bind)?;
    tokio::time::timeout(Duration::from_secs(10), sock.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

fn log_record(rec: &ConnectionRecord) {
    if std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        if let Ok(line) = serde_json::to_string(rec) {
            info!(target: "access", "{line}");
        }
        return;
    }
    match &rec.error {
        None => info!(target: "access", direction = ?rec.direction, pod = %rec.pod, src = %rec.src,
            dst = %rec.dst, bytes_sent = rec.bytes_sent, bytes_recv = rec.bytes_received,
            duration_ms = rec.duration_ms, "connection complete"),
        Some(e) => warn!(target: "access", direction = ?rec.direction, pod = %rec.pod, src = %rec.src,
            dst = %rec.dst, duration_ms = rec.duration_ms, error = %e, "connection failed"),
    }
}

/// Accepts on `listener` forever, handing each connection to `handle`.
pub(crate) async fn accept_loop<F, Fut>(listener: tokio::net::TcpListener, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle(stream, peer));
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
