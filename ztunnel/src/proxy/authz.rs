//! Authorization at the destination pod: checked when a connection arrives and re-checked
//! whenever the policy set changes, so a new DENY (or a removed ALLOW) cuts connections
//! that are already open.
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::AbortHandle;
use tracing::warn;

use super::ProxyContext;
use crate::policy::{evaluate, ConnectionFacts, Decision};

/// Evaluates the pod's policies for a new connection (and counts denials).
pub fn check(ctx: &ProxyContext, facts: &ConnectionFacts, direction: &str) -> Decision {
    let snap = ctx.mesh.state.snapshot();
    let workload = ctx.pod.workload(&ctx.mesh.state);
    let d = evaluate(snap.policies(), &workload, facts);
    if let Decision::Deny(reason) = &d {
        ctx.mesh.metrics.policy_denied(direction);
        warn!(pod = %ctx.pod.uid, src = %facts.source_ip, dst = %facts.destination,
            identity = ?facts.source_identity.as_ref().map(|i| i.to_string()), %reason, "connection denied");
    }
    d
}

/// Keeps re-checking an open connection; when it stops being allowed, shuts down its
/// sockets (both directions end, so the relay returns). Stops when dropped.
pub struct Watch {
    task: AbortHandle,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching `facts` against policy changes; `sockets` are shut down on revocation.
pub fn watch(ctx: &ProxyContext, facts: ConnectionFacts, sockets: Vec<OwnedFd>, direction: &'static str) -> Watch {
    let ctx = ctx.clone();
    let mut changes = ctx.mesh.state.subscribe();
    let task = tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            if let Decision::Deny(_) = check(&ctx, &facts, direction) {
                for s in &sockets {
                    // SAFETY: shutting down a socket fd we own a duplicate of.
                    unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
                }
                warn!(pod = %ctx.pod.uid, src = %facts.source_ip, dst = %facts.destination, "open connection closed: no longer allowed by policy");
                return;
            }
        }
    });
    Watch { task: task.abort_handle() }
}

/// A stream that carries its policy watch: dropping the stream stops the watch.
pub struct Guarded<S> {
    pub inner: S,
    pub watch: Watch,
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A duplicate of a socket's fd, for [`watch`] to shut it down later.
pub fn dup_fd(s: &impl std::os::fd::AsFd) -> Option<OwnedFd> {
    s.as_fd().try_clone_to_owned().ok()
}
