//! Authorization at the destination pod: checked when a connection arrives and re-checked
//! whenever the policy set changes, so a new DENY (or a removed ALLOW) cuts connections
//! that are already open.
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::AbortHandle;
use tracing::warn;

use super::ProxyContext;
use crate::hbone::CopyIo;
use crate::policy::{evaluate, ConnectionFacts, Decision};

/// Why connections are refused before the control plane's first state arrived.
pub const NOT_SYNCED: &str = "waiting for the control plane's first configuration";

/// Why a pod's connections are refused while the control plane has not described it.
pub const NO_WORKLOAD: &str = "the control plane has not described this pod's workload";

/// Evaluates the pod's policies for a new connection (and counts denials).
pub fn check(ctx: &ProxyContext, facts: &ConnectionFacts, direction: &str) -> Decision {
    let d = if ctx.mesh.state.is_synced() {
        let snap = ctx.mesh.state.snapshot();
        match ctx.pod.workload(&snap) {
            Some(workload) => evaluate(snap.policies(), &workload.policy_target(), facts),
            None => Decision::Deny(NO_WORKLOAD.into()),
        }
    } else {
        Decision::Deny(NOT_SYNCED.into())
    };
    if let Decision::Deny(reason) = &d {
        ctx.mesh.metrics.policy_denied(direction);
        warn!(pod = %ctx.pod.uid, src = %facts.source_ip, dst = %facts.destination,
            identity = ?facts.source_identity.as_ref().map(|i| i.to_string()), %reason, "connection denied");
    }
    d
}

/// Set once, when policy stops allowing a connection; wakes the task copying its bytes.
#[derive(Default)]
struct Revocation {
    revoked: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Revocation {
    fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
    }

    /// Whether revoked; if not, the polling task is woken when it is.
    fn poll_revoked(&self, cx: &mut Context<'_>) -> bool {
        if self.revoked.load(Ordering::SeqCst) {
            return true;
        }
        {
            let mut slot = self.waker.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
        }
        self.revoked.load(Ordering::SeqCst)
    }
}

/// Keeps re-checking an open connection against policy changes; when it stops being
/// allowed, the [`Guarded`] stream carrying this watch fails both ways, so the copy ends and
/// both sockets close. No fd is duplicated for it. Stops when dropped.
pub struct Watch {
    task: AbortHandle,
    revocation: Arc<Revocation>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching `facts` against policy changes.
pub fn watch(ctx: &ProxyContext, facts: ConnectionFacts, direction: &'static str) -> Watch {
    let ctx = ctx.clone();
    let mut changes = ctx.mesh.state.subscribe();
    let revocation = Arc::new(Revocation::default());
    let rev = revocation.clone();
    let task = tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            if let Decision::Deny(_) = check(&ctx, &facts, direction) {
                rev.revoke();
                warn!(pod = %ctx.pod.uid, src = %facts.source_ip, dst = %facts.destination, "open connection closed: no longer allowed by policy");
                return;
            }
        }
    });
    Watch { task: task.abort_handle(), revocation }
}

/// A stream that carries its policy watch: once revoked, reads and writes fail; dropping
/// the stream stops the watch.
pub struct Guarded<S> {
    pub inner: S,
    pub watch: Watch,
}

fn revoked_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "connection no longer allowed by policy")
}

impl<S> Guarded<S> {
    /// Runs one read or write on the inner stream unless the connection was revoked.
    fn guard<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(&mut S, &mut Context<'_>) -> Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if self.watch.revocation.revoked.load(Ordering::Acquire) {
            return Poll::Ready(Err(revoked_error()));
        }
        match op(&mut self.inner, cx) {
            // Only a task about to wait needs waking on revocation: register then, so the
            // busy path costs one atomic load.
            Poll::Pending if self.watch.revocation.poll_revoked(cx) => Poll::Ready(Err(revoked_error())),
            r => r,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.guard(cx, |s, cx| Pin::new(s).poll_read(cx, buf))
    }
}

/// Revocation ends chunked copies as it ends reads and writes.
impl<S: CopyIo> CopyIo for Guarded<S> {
    fn reads_chunks(&self) -> bool {
        self.inner.reads_chunks()
    }
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Bytes>> {
        self.guard(cx, |s, cx| s.poll_read_chunk(cx))
    }
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &Bytes) -> Poll<std::io::Result<usize>> {
        self.guard(cx, |s, cx| s.poll_write_chunk(cx, chunk))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.guard(cx, |s, cx| Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
