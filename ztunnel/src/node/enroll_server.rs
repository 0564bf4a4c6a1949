//! The agent's side of enrollment: serving its own socket (one task per CNI connection)
//! and the request handler that both that server and the ZDS client (`zds_client`, the
//! agent connecting to the CNI's socket) run on a connection. Requests are handled in
//! order, every request answered with an `Ack` (empty error = success). Bad input is
//! answered with a reason and never ends the connection.
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use prost::Message;
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use super::pod::{Listeners, PodProxy};
use super::pod_state::{self, PodState};
use super::Shared;
use crate::enrollment::socket::accept_seqpacket;
use crate::enrollment::{
    recv_datagram, send_datagram, workload_request::Payload, workload_response, Ack, WireError, WorkloadRequest,
    WorkloadResponse,
};
use crate::netns::InpodNetns;
use crate::proxy::PodContext;

/// Accepts CNI connections until aborted; aborting also ends every connection task.
pub(super) async fn serve(listener: OwnedFd, shared: Arc<Shared>) {
    accept_seqpacket(listener, "enrollment", move |fd| connection(fd, shared.clone())).await
}

/// Serves one enrollment connection, whichever side opened it (a CNI that connected to our
/// socket, or the CNI's socket we connected to): requests in order, one `Ack` each, until
/// the peer closes. The fd must be non-blocking.
pub(super) async fn connection(fd: OwnedFd, shared: Arc<Shared>) {
    // SAFETY: as above, the connection fd is owned here only.
    let Ok(conn) = (unsafe { AsyncFd::register(fd) }) else { return };
    loop {
        let Ok(mut guard) = conn.readable().await else { return };
        let dgram = match recv_datagram(conn.as_raw_fd()) {
            Ok(d) => d,
            Err(WireError::Io(nix::Error::EAGAIN)) => {
                guard.clear_ready();
                continue;
            }
            Err(WireError::Closed) => return,
            Err(WireError::Truncated) => {
                shared.mesh.metrics.enrollment_rejected();
                reply(&conn, Err(format!("request larger than {} bytes", crate::enrollment::MAX_DATAGRAM)));
                continue;
            }
            Err(e) => return warn!(error = %e, "enrollment connection failed"),
        };
        let outcome = handle(&shared, &dgram.bytes, dgram.fds);
        if let Err(e) = &outcome {
            shared.mesh.metrics.enrollment_rejected();
            warn!(error = %e, "enrollment request rejected");
        }
        reply(&conn, outcome);
    }
}

fn reply(conn: &AsyncFd<OwnedFd>, outcome: Result<(), String>) {
    let resp = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack { error: outcome.err().unwrap_or_default() })),
    };
    // The reply is tiny; a full socket buffer here means the peer stopped reading.
    if let Err(e) = send_datagram(conn.as_raw_fd(), &resp.encode_to_vec(), &[]) {
        warn!(error = %e, "cannot send ack");
    }
}

/// Applies one request. Errors are the text of the `Ack`.
fn handle(shared: &Shared, bytes: &[u8], mut fds: Vec<OwnedFd>) -> Result<(), String> {
    if shared.retirement.handed_off() {
        return Err("this agent handed its pods to a successor; reconnect to the enrollment socket".into());
    }
    let req = WorkloadRequest::decode(bytes).map_err(|e| format!("malformed request: {e}"))?;
    let payload = req.payload.ok_or("malformed request: no payload")?;
    // Uids name state files and pin directories: nothing that could leave those directories.
    let uid = match &payload {
        Payload::Add(a) => Some(&a.uid),
        Payload::Keep(k) => Some(&k.uid),
        Payload::Del(d) => Some(&d.uid),
        Payload::SnapshotSent(_) => None,
    };
    if let Some(uid) = uid.filter(|u| !u.is_empty() && !pod_state::valid_uid(u)) {
        return Err(format!("invalid pod uid {uid:?}: only [A-Za-z0-9_-], at most 128 characters"));
    }
    match payload {
        Payload::Add(add) => {
            let uid = add.uid;
            if uid.is_empty() {
                return Err("Add without uid".into());
            }
            let info = add.workload_info.ok_or_else(|| format!("Add {uid}: missing workload_info"))?;
            if fds.len() != 1 {
                return Err(format!("Add {uid}: expected exactly 1 network namespace fd, got {}", fds.len()));
            }
            let id = PodIdentity {
                uid: uid.clone(),
                name: info.name,
                namespace: info.namespace,
                service_account: info.service_account,
            };
            let result = add_request(shared, id, fds.remove(0));
            if result.is_err() && pod_state::load(&shared.state_dir, &uid).is_some() {
                // A pod captured before (e.g. before a crash) that cannot be served now (say
                // something in it holds 15001) stays captured and fails closed: it counts as
                // present at SnapshotSent instead of being released unproxied.
                shared.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(uid);
            }
            result
        }
        Payload::Keep(keep) => {
            // Keep only means something for a pod this process serves. A pod known from
            // before a restart but never re-Added has no listeners: its capture would drop
            // every connection. It is refused here and released at SnapshotSent.
            if !shared.pods.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&keep.uid) {
                return Err(match pod_state::load(&shared.state_dir, &keep.uid) {
                    Some(_) => {
                        format!("Keep {}: not served since the agent restarted; send Add with its netns", keep.uid)
                    }
                    None => format!("Keep {}: unknown pod", keep.uid),
                });
            }
            shared.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(keep.uid);
            Ok(())
        }
        Payload::Del(del) => {
            let uid = del.uid;
            let st = pod_state::load(&shared.state_dir, &uid).ok_or_else(|| format!("Del {uid}: unknown pod"))?;
            remove_pod(shared, &st)?;
            info!(%uid, "pod removed");
            Ok(())
        }
        Payload::SnapshotSent(_) => {
            let seen = shared.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for st in pod_state::load_all(&shared.state_dir) {
                if !seen.contains(&st.uid) {
                    warn!(uid = %st.uid, "releasing pod not re-added in the snapshot: no proxy serves it");
                    remove_pod(shared, &st)?;
                }
            }
            Ok(())
        }
    }
}

/// An Add once the request is well formed. Adds are idempotent: a CNI re-sends every pod
/// after a reconnect, and the same pod in the same netns is acknowledged and counts as
/// present for SnapshotSent (as Istio's ztunnel). The same pod in a new netns (its sandbox
/// was re-created) replaces the old one.
fn add_request(shared: &Shared, id: PodIdentity, netns_fd: OwnedFd) -> Result<(), String> {
    let uid = id.uid.clone();
    let netns = InpodNetns::new(File::from(netns_fd)).map_err(|e| format!("Add {uid}: {e}"))?;
    let served = shared.pods.lock().unwrap_or_else(|e| e.into_inner()).get(&uid).map(|p| p.ctx.pod.netns.cookie());
    match served {
        Some(cookie) if cookie == netns.cookie() => {
            shared.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(uid);
            return Ok(());
        }
        Some(_) => {
            let st = pod_state::load(&shared.state_dir, &uid)
                .ok_or_else(|| format!("Add {uid}: enrolled in another netns without a state file"))?;
            remove_pod(shared, &st)?;
            info!(%uid, "pod re-added with a new network namespace; the old one was released");
        }
        None => {}
    }
    let mut pods = shared.pods.lock().unwrap_or_else(|e| e.into_inner());
    add_pod(shared, &mut pods, id, netns)
}

/// The work of an Add once the request is well formed: its netns must not be enrolled
/// under another uid (two uids would share, and overwrite, its kernel entries).
fn add_pod(
    shared: &Shared,
    pods: &mut std::collections::HashMap<String, PodProxy>,
    id: PodIdentity,
    netns: InpodNetns,
) -> Result<(), String> {
    let uid = id.uid.clone();
    if pods.contains_key(&uid) {
        return Err(format!("Add {uid}: pod is already enrolled (a concurrent Add)"));
    }
    if let Some(other) = pods.values().find(|p| p.ctx.pod.netns.cookie() == netns.cookie()) {
        return Err(format!("Add {uid}: its network namespace is already enrolled as {}", other.ctx.pod.uid));
    }
    let listeners = Listeners::open(&netns).map_err(|e| format!("Add {uid}: {e}"))?;
    admit(shared, pods, id, netns, listeners)
}

/// Who a pod is, as enrollment (or a handover) names it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct PodIdentity {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

/// Starts serving a pod on `listeners` (capture, proxy tasks, state file) and records it in
/// `pods`. Shared by Add and by taking pods over from a previous agent.
pub(super) fn admit(
    shared: &Shared,
    pods: &mut std::collections::HashMap<String, PodProxy>,
    id: PodIdentity,
    netns: InpodNetns,
    listeners: Listeners,
) -> Result<(), String> {
    let uid = id.uid.clone();
    let cookie = netns.cookie();
    let ips = netns
        .run(crate::netns::pod_addresses_here)
        .and_then(|r| r)
        .map_err(|e| format!("Add {uid}: listing pod addresses: {e}"))?;
    let ctx = PodContext {
        ips,
        server_tls: Default::default(),
        limits: crate::proxy::limit::PodLimits::new(&shared.mesh.limits),
        uid: id.uid,
        name: id.name,
        namespace: id.namespace,
        service_account: id.service_account,
        netns,
        keep_source: None,
        wants_source: false,
    };
    let proxy = PodProxy::start(shared, ctx, listeners).map_err(|e| format!("Add {uid}: {e}"))?;
    let st = PodState { uid: uid.clone(), netns_cookie: cookie, ips: proxy.ips.clone() };
    if let Err(e) = pod_state::save(&shared.state_dir, &st) {
        let _ = shared.capture.unenroll(&uid, cookie);
        return Err(format!("Add {uid}: saving state: {e}"));
    }
    info!(%uid, ips = ?st.ips, netns_cookie = cookie, "pod enrolled");
    pods.insert(uid.clone(), proxy);
    shared.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(uid);
    Ok(())
}

/// Kernel state first (detach, clear maps), then close the listeners.
fn remove_pod(shared: &Shared, st: &PodState) -> Result<(), String> {
    shared.capture.unenroll(&st.uid, st.netns_cookie).map_err(|e| format!("removing {}: {e}", st.uid))?;
    pod_state::remove(&shared.state_dir, &st.uid);
    shared.registry.remove(&st.ips);
    shared.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(&st.uid);
    drop(shared.pods.lock().unwrap_or_else(|e| e.into_inner()).remove(&st.uid));
    Ok(())
}
