//! The waypoint's serving threads, Envoy's worker model: each thread has its own
//! single-threaded runtime, accepts on the one HBONE listening socket (each thread holds a
//! duplicate of it in its own reactor; whichever is free first takes a new connection) and
//! has its own upstream connections. A request is read, routed, forwarded and answered on
//! one thread, with no task woken on another thread. On a multi-threaded work-stealing
//! runtime the same request cost about twice the CPU at 1000 requests/s (futex wake-ups and
//! migrations between workers; measured in docs/decisions.md). State, routes, metrics, the
//! access log and the per-cluster limits stay shared.
//!
//! One socket, not one `SO_REUSEPORT` socket per thread: with `SO_REUSEPORT` any other
//! process of the same user in the pod could join the port, or bind the pod's own address
//! on it and take every connection; a plain listener makes such a bind fail.
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tracing::error;

use super::{accept, upstream_pool, Shared};
use crate::identity::{CertManager, Identity};

/// Pending connections the listener queues.
const BACKLOG: u32 = 1024;

/// A serving thread; dropping it stops its runtime, which ends the thread's connections,
/// and waits for the thread, so the port is free once every worker is dropped.
pub(crate) struct Worker {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Ends the process when a serving thread ends without being asked to (a panic in its
/// runtime): its share of the connections would otherwise be lost silently while
/// readiness stays green. The orchestrator restarts the waypoint.
struct ExitGuard {
    thread: usize,
    stopped: bool,
    /// Written out before the process ends.
    log: Arc<super::log_writer::LineWriter>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if !self.stopped {
            error!(thread = self.thread, "waypoint serving thread ended unexpectedly; exiting");
            self.log.flush();
            std::process::exit(70);
        }
    }
}

/// Binds the HBONE listener on `listen` and starts `threads` serving threads on it;
/// returns its address.
pub(crate) async fn start(
    threads: usize,
    listen: SocketAddr,
    shared: &Arc<Shared>,
    certs: &CertManager,
    identity: &Identity,
) -> std::io::Result<(SocketAddr, Vec<Worker>)> {
    let socket = if listen.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    // Listened here, then taken off this runtime: each thread registers its own duplicate.
    let listener = socket.listen(BACKLOG)?.into_std()?;
    let addr = listener.local_addr()?;
    let mut workers = Vec::with_capacity(threads);
    for i in 0..threads {
        let own = listener.try_clone()?;
        let (stop, stopped) = oneshot::channel();
        let (shared, certs, identity) = (shared.clone(), certs.clone(), identity.clone());
        let (ready_tx, ready) = oneshot::channel();
        let thread = std::thread::Builder::new().name(format!("waypoint-{i}")).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            let mut guard = ExitGuard { thread: i, stopped: false, log: shared.access_log.writer() };
            rt.block_on(async move {
                let listener = match TcpListener::from_std(own) {
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
            drop(rt);
            guard.stopped = true;
        })?;
        let worker = Worker { stop: Some(stop), thread: Some(thread) };
        // A thread that cannot serve fails the start instead of leaving a silent gap.
        match ready.await {
            Ok(Ok(())) => workers.push(worker),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(std::io::Error::other(format!("waypoint thread {i} ended before serving"))),
        }
    }
    Ok((addr, workers))
}
