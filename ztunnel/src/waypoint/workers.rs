//! The waypoint's serving threads, Envoy's worker model: each thread has its own
//! single-threaded runtime, its own listener on the HBONE port (`SO_REUSEPORT`, so the
//! kernel spreads connections over them) and its own upstream connections. A request is read,
//! routed, forwarded and answered on one thread, with no task woken on another thread. On a
//! multi-threaded work-stealing runtime the same request cost about twice the CPU at 1000
//! requests/s (futex wake-ups and migrations between workers; measured in docs/decisions.md).
//! State, routes, metrics, the access log and the per-cluster limits stay shared.
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpSocket;
use tokio::sync::oneshot;
use tracing::warn;

use super::{accept, upstream_pool, Shared};
use crate::identity::{CertManager, Identity};

/// Pending connections a listener queues (per thread).
const BACKLOG: u32 = 1024;

/// A serving thread; dropping it stops its runtime, which ends the thread's connections.
pub(crate) struct Worker {
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A socket bound to `addr` that other sockets of this process may bind too.
fn reuse_port_socket(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Binds `threads` listeners on `listen` (the first one's port when `listen` asks for any
/// port) and starts a serving thread for each; returns the address they share.
pub(crate) async fn start(
    threads: usize,
    listen: SocketAddr,
    shared: &Arc<Shared>,
    certs: &CertManager,
    identity: &Identity,
) -> std::io::Result<(SocketAddr, Vec<Worker>)> {
    let first = reuse_port_socket(listen)?;
    let addr = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..threads {
        sockets.push(reuse_port_socket(addr)?);
    }
    let mut workers = Vec::with_capacity(threads);
    for (i, socket) in sockets.into_iter().enumerate() {
        let (stop, stopped) = oneshot::channel();
        let (shared, certs, identity) = (shared.clone(), certs.clone(), identity.clone());
        let (ready_tx, ready) = oneshot::channel();
        std::thread::Builder::new().name(format!("waypoint-{i}")).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            rt.block_on(async move {
                // Listening registers the socket with this thread's reactor.
                let listener = match socket.listen(BACKLOG) {
                    Ok(l) => l,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let _ = ready_tx.send(Ok(()));
                let shared = Arc::new(shared.with_pool(upstream_pool(&certs)));
                tokio::select! {
                    _ = accept(listener, shared, certs, identity) => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime here cancels the thread's connections.
        })?;
        // A thread that cannot listen fails the start instead of leaving a silent gap.
        match ready.await {
            Ok(Ok(())) => workers.push(Worker { stop: Some(stop) }),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                warn!(thread = i, "waypoint thread ended before listening");
                return Err(std::io::Error::other(format!("waypoint thread {i} ended before listening")));
            }
        }
    }
    Ok((addr, workers))
}
