//! Hitless agent replacement (upgrade or restart): the running agent hands every pod's
//! netns and listening sockets to its successor over a unix socket (`SCM_RIGHTS`), as
//! Envoy's hot restart hands over listeners. The kernel listeners never close, so no new
//! connection is refused: the backlog just fills until the successor accepts. The old agent
//! then stops accepting, sends GOAWAY on its HBONE connections (peers open new ones, which
//! land on the successor) and keeps relaying what it already accepted until that drains
//! or a deadline passes.
//!
//! Wire: one JSON message per datagram on a `SOCK_SEQPACKET` socket. Old → new:
//! `pod` (+ 5 fds: netns, outbound v4, outbound v6, inbound 15006, HBONE 15008) per pod,
//! then `done`; new → old: `taken` once it serves them all.
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
use tracing::{info, warn};

use super::enroll_server::{admit, PodIdentity};
use super::pod::Listeners;
use super::Shared;
use crate::enrollment::socket::{accept_seqpacket, same_user};
use crate::enrollment::{recv_datagram, send_datagram};
use crate::netns::InpodNetns;
use crate::proxy::limit::PodLimits;

/// How long either side waits for the other's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Pod(PodIdentity),
    Done,
    Taken,
}

/// What a retiring agent still tracks: whether it handed over, and its accepted
/// connections (through the pods' connection limits) until they drain.
#[derive(Default)]
pub(crate) struct Retirement {
    handed_off: AtomicBool,
    limits: Mutex<Vec<PodLimits>>,
    retired: tokio::sync::Notify,
}

impl Retirement {
    /// Whether this agent's pods now belong to a successor.
    pub fn handed_off(&self) -> bool {
        self.handed_off.load(Ordering::Acquire)
    }

    /// Waits until the pods were handed over.
    pub async fn wait_handed_off(&self) {
        let notified = self.retired.notified();
        if self.handed_off() {
            return;
        }
        notified.await
    }

    /// Connections accepted before the handover that are still open.
    pub fn open_connections(&self, per_listener_cap: usize) -> usize {
        let limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        limits
            .iter()
            .flat_map(|l| [&l.outbound, &l.inbound_passthrough, &l.inbound_hbone])
            .map(|l| per_listener_cap.max(1).saturating_sub(l.available()))
            .sum()
    }

    /// Waits until handed over and then until every old connection ended or `deadline` passed;
    /// returns the connections still open at the end.
    pub async fn drained(&self, per_listener_cap: usize, deadline: Duration) -> usize {
        self.wait_handed_off().await;
        let until = Instant::now() + deadline;
        loop {
            let open = self.open_connections(per_listener_cap);
            if open == 0 || Instant::now() >= until {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Serves successors on `listener` until aborted.
pub(super) async fn serve(listener: OwnedFd, shared: Arc<Shared>) {
    accept_seqpacket(listener, "handoff", move |fd| {
        let shared = shared.clone();
        async move {
            let result = tokio::task::spawn_blocking(move || give(fd, &shared)).await;
            match result {
                Ok(Ok(n)) => info!(pods = n, "handed every pod to the successor; draining"),
                Ok(Err(e)) => warn!(error = %e, "handoff to a successor failed; still serving"),
                Err(e) => warn!(error = %e, "handoff task failed"),
            }
        }
    })
    .await
}

fn blocking(fd: &OwnedFd) -> Result<(), String> {
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).map_err(|e| e.to_string())?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(|e| e.to_string())?;
    // Bounded both ways: a peer that stops reading or writing cannot hold the pods forever.
    let step = nix::sys::time::TimeVal::new(STEP_TIMEOUT.as_secs() as i64, 0);
    setsockopt(fd, sockopt::ReceiveTimeout, &step).map_err(|e| e.to_string())?;
    setsockopt(fd, sockopt::SendTimeout, &step).map_err(|e| e.to_string())
}

fn send(fd: &OwnedFd, msg: &Message, fds: &[OwnedFd]) -> Result<(), String> {
    let bytes = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    send_datagram(fd.as_raw_fd(), &bytes, &raw).map_err(|e| e.to_string())
}

fn recv(fd: &OwnedFd) -> Result<(Message, Vec<OwnedFd>), String> {
    let d = recv_datagram(fd.as_raw_fd()).map_err(|e| e.to_string())?;
    let msg = serde_json::from_slice(&d.bytes).map_err(|e| format!("bad handoff message: {e}"))?;
    Ok((msg, d.fds))
}

/// Old side: sends every pod, waits for `taken`, then stops serving them here.
fn give(fd: OwnedFd, shared: &Shared) -> Result<usize, String> {
    blocking(&fd)?;
    let mut pods = shared.pods.lock().unwrap_or_else(|e| e.into_inner());
    for proxy in pods.values() {
        let p = &proxy.ctx.pod;
        let id = PodIdentity {
            uid: p.uid.clone(),
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            service_account: p.service_account.clone(),
        };
        let fds = proxy.handover_fds().map_err(|e| format!("duplicating {}'s sockets: {e}", p.uid))?;
        send(&fd, &Message::Pod(id), &fds)?;
    }
    send(&fd, &Message::Done, &[])?;
    match recv(&fd)? {
        (Message::Taken, _) => {}
        (other, _) => return Err(format!("successor answered {other:?} instead of taken")),
    }
    let n = pods.len();
    let retirement = &shared.retirement;
    *retirement.limits.lock().unwrap_or_else(|e| e.into_inner()) =
        pods.values().map(|p| p.ctx.pod.limits.clone()).collect();
    // Stop accepting (the successor holds the same listeners); accepted connections go on.
    pods.clear();
    let _ = shared.drain.send(true);
    retirement.handed_off.store(true, Ordering::Release);
    retirement.retired.notify_waiters();
    Ok(n)
}

/// New side: takes every pod from the agent serving `path`, if one answers. Returns how
/// many pods this agent now serves; a pod that cannot be started is logged and left to be
/// re-Added by the CNI.
pub(super) fn take(path: &Path, shared: &Shared) -> Result<usize, String> {
    let fd =
        socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(|e| e.to_string())?;
    let addr = UnixAddr::new(path).map_err(|e| e.to_string())?;
    if connect(fd.as_raw_fd(), &addr).is_err() {
        return Ok(0); // nobody to take over from
    }
    // Only take sockets from an agent running as our own user.
    same_user(&fd)?;
    blocking(&fd)?;
    let mut pods = shared.pods.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        match recv(&fd)? {
            (Message::Pod(id), mut fds) if fds.len() == 5 => {
                let uid = id.uid.clone();
                let netns = InpodNetns::new(std::fs::File::from(fds.remove(0)));
                let started = netns
                    .map_err(|e| e.to_string())
                    .and_then(|netns| Ok((netns, Listeners::from_fds(fds)?)))
                    .and_then(|(netns, listeners)| admit(shared, &mut pods, id, netns, listeners));
                if let Err(e) = started {
                    warn!(%uid, error = %e, "could not take over pod; it needs a new Add");
                }
            }
            (Message::Pod(id), fds) => warn!(uid = %id.uid, fds = fds.len(), "pod handed over without its 5 fds"),
            (Message::Done, _) => break,
            (other, _) => return Err(format!("unexpected {other:?} from the previous agent")),
        }
    }
    send(&fd, &Message::Taken, &[])?;
    Ok(pods.len())
}
