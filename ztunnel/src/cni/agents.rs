//! `ztunnel cni`'s side of ZDS: it serves `INPOD_UDS` to whichever node agent connects (ours,
//! or Istio's ztunnel), reads the agent's `ZdsHello` first, then carries the manager's
//! requests to it one at a time (one message per datagram, the netns fd in `SCM_RIGHTS` on
//! Add) and waits for each Ack. Also the plugin socket's connection handler.
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::api::{PluginRequest, PluginResponse};
use super::manager::{AgentLink, AgentRequest, Event};
use crate::enrollment::{
    recv_async, recv_datagram, send_async, workload_response, Version, WireError, WorkloadResponse, ZdsHello,
};

/// How long an agent has to say hello, and to answer each request (as istio-cni).
pub(super) const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// One agent connection, from hello to close. Registers itself with the manager, then
/// carries requests until the agent goes away (or answers late), and says so.
pub(super) async fn agent_connection(fd: OwnedFd, events: mpsc::Sender<Event>, ids: Arc<AtomicU64>) {
    // SAFETY: we own the fd and nothing else registers or closes it while `conn` lives.
    let Ok(conn) = (unsafe { AsyncFd::register(fd) }) else { return };
    let hello = match tokio::time::timeout(STEP_TIMEOUT, recv_async(&conn)).await {
        Ok(Ok(d)) => ZdsHello::decode(d.bytes.as_slice()).map_err(|e| format!("not a ZdsHello: {e}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no hello within {STEP_TIMEOUT:?}")),
    };
    match hello {
        Ok(h) if h.version == Version::V1 as i32 => {}
        Ok(h) => return warn!(version = h.version, "node agent speaks an unknown ZDS version; closing"),
        Err(why) => return warn!(%why, "node agent connection closed before its hello"),
    }
    let id = ids.fetch_add(1, Ordering::Relaxed);
    info!(agent = id, "node agent connected");
    let (tx, mut rx) = mpsc::channel::<AgentRequest>(16);
    if events.send(Event::AgentConnected(AgentLink::new(id, tx))).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            req = rx.recv() => {
                let Some(req) = req else { break };
                let outcome = exchange(&conn, &req).await;
                let dead = outcome.is_err();
                let _ = req.reply.send(outcome);
                if dead {
                    break;
                }
            }
            // An agent only ever answers: anything readable now is its close (or a protocol error).
            guard = conn.readable() => {
                let Ok(mut guard) = guard else { break };
                match recv_datagram(conn.as_raw_fd()) {
                    Err(WireError::Io(nix::Error::EAGAIN)) => guard.clear_ready(),
                    Err(WireError::Closed) => break,
                    Err(e) => { warn!(agent = id, error = %e, "node agent connection failed"); break }
                    Ok(_) => { warn!(agent = id, "unsolicited message from the node agent; closing"); break }
                }
            }
        }
    }
    info!(agent = id, "node agent disconnected");
    let _ = events.send(Event::AgentClosed(id)).await;
}

/// Sends one request and waits for its Ack. `Err` means the connection is unusable;
/// `Ok(Err(reason))` is an Ack with an error.
async fn exchange(conn: &AsyncFd<OwnedFd>, req: &AgentRequest) -> Result<Result<(), String>, String> {
    let fds: Vec<i32> = req.netns.iter().map(AsRawFd::as_raw_fd).collect();
    send_async(conn, &req.bytes, &fds).await.map_err(|e| format!("sending: {e}"))?;
    let reply = tokio::time::timeout(STEP_TIMEOUT, recv_async(conn))
        .await
        .map_err(|_| format!("no Ack within {STEP_TIMEOUT:?}"))?
        .map_err(|e| format!("receiving the Ack: {e}"))?;
    let resp = WorkloadResponse::decode(reply.bytes.as_slice()).map_err(|e| format!("not a WorkloadResponse: {e}"))?;
    match resp.payload {
        Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(Ok(())),
        Some(workload_response::Payload::Ack(ack)) => Ok(Err(ack.error)),
        None => Err("empty WorkloadResponse".into()),
    }
}

/// One plugin request: read it, hand it to the manager, send back its answer.
pub(super) async fn plugin_connection(fd: OwnedFd, events: mpsc::Sender<Event>) {
    // SAFETY: as above.
    let Ok(conn) = (unsafe { AsyncFd::register(fd) }) else { return };
    let req = match tokio::time::timeout(STEP_TIMEOUT, recv_async(&conn)).await {
        Ok(Ok(d)) => serde_json::from_slice::<PluginRequest>(&d.bytes).map_err(|e| format!("bad request: {e}")),
        Ok(Err(e)) => return warn!(error = %e, "plugin connection failed"),
        Err(_) => return warn!("plugin sent no request"),
    };
    let resp = match req {
        Ok(req) => {
            let (reply, answer) = oneshot::channel();
            if events.send(Event::Plugin(req, reply)).await.is_err() {
                return;
            }
            answer.await.unwrap_or_else(|_| PluginResponse::err("the daemon is shutting down"))
        }
        Err(why) => PluginResponse::err(why),
    };
    match serde_json::to_vec(&resp) {
        Ok(bytes) => {
            if let Err(e) = send_async(&conn, &bytes, &[]).await {
                warn!(error = %e, "cannot answer the plugin");
            }
        }
        Err(e) => warn!(error = %e, "cannot encode the answer"),
    }
}
