//! The node agent in Istio's direction of ZDS: the CNI side (`ztunnel cni` or istio-cni)
//! serves the enrollment socket (`INPOD_UDS`) and the agent connects to it, says
//! `ZdsHello{V1}` first, then answers the CNI's requests with the same handler its own
//! enrollment server uses. Each new connection starts a new snapshot: the CNI re-sends
//! every pod (Add, or Keep) and `SnapshotSent` releases the pods it did not mention, so
//! either side restarting reconciles the enrolled set.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{enroll_server, Shared};
use crate::enrollment::{hello, send_datagram, socket};

/// First retry delay; doubled after each failed attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// Longest wait between attempts. The socket is node-local, so a failed attempt costs
/// microseconds: a short cap lets a restarted CNI get its agent back within a second.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Connects to the CNI's socket and serves it until the task is aborted or this agent hands
/// its pods to a successor; reconnects with backoff while the socket is absent, refuses,
/// or closes.
pub(super) async fn run(path: PathBuf, shared: Arc<Shared>) {
    let mut backoff = FIRST_BACKOFF;
    let mut waiting_logged = false;
    loop {
        if shared.retirement.handed_off() {
            return info!("pods handed to a successor; leaving the CNI socket to it");
        }
        match socket::connect(&path, true) {
            Ok(fd) => match send_datagram(std::os::fd::AsRawFd::as_raw_fd(&fd), &hello(), &[]) {
                Ok(()) => {
                    info!(socket = %path.display(), "connected to the CNI; waiting for its snapshot");
                    backoff = FIRST_BACKOFF;
                    waiting_logged = false;
                    // A new snapshot: only pods the CNI sends on this connection stay.
                    shared.seen.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    tokio::select! {
                        _ = enroll_server::connection(fd, shared.clone()) => {
                            info!(socket = %path.display(), "the CNI closed the connection; reconnecting");
                        }
                        _ = shared.retirement.wait_handed_off() => continue,
                    }
                }
                Err(e) => warn!(socket = %path.display(), error = %e, "cannot send ZdsHello"),
            },
            Err(socket::ConnectError::Peer(why)) => warn!(socket = %path.display(), %why, "refusing the CNI socket"),
            Err(e) if !waiting_logged => {
                waiting_logged = true;
                warn!(socket = %path.display(), error = %e, "CNI socket not available; retrying until it is");
            }
            Err(e) => debug!(socket = %path.display(), error = %e, retry_in = ?backoff, "CNI socket not available"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
