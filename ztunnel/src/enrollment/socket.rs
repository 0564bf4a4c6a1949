//! The unix `SOCK_SEQPACKET` sockets both ends of enrollment use: binding an owner-only
//! listener, accepting only peers of our own uid, and connecting. Shared by the node agent
//! (enrollment server, handover, ZDS client) and `ztunnel cni` (ZDS server, plugin socket),
//! so every socket that can hand over a pod's network namespace is guarded the same way.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{
    accept4, bind as nix_bind, connect as nix_connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType,
    UnixAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::task::JoinSet;
use tracing::warn;

/// Creates a listening, non-blocking `SOCK_SEQPACKET` socket at `path` (replacing a stale
/// socket file). Whoever can talk to these sockets can enroll pods or take every pod's
/// sockets: the file is made owner-only, and [`accept_seqpacket`] also checks the peer's uid.
pub fn bind(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    nix_bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))?;
    Ok(fd)
}

/// Connects a `SOCK_SEQPACKET` socket to `path`, non-blocking once connected when
/// `nonblocking` (for tokio), and refuses a listener that runs as another user.
pub fn connect(path: &Path, nonblocking: bool) -> Result<OwnedFd, ConnectError> {
    let flags = if nonblocking { SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK } else { SockFlag::SOCK_CLOEXEC };
    let fd = socket(AddressFamily::Unix, SockType::SeqPacket, flags, None).map_err(ConnectError::Connect)?;
    nix_connect(fd.as_raw_fd(), &UnixAddr::new(path).map_err(ConnectError::Connect)?).map_err(ConnectError::Connect)?;
    same_user(&fd).map_err(ConnectError::Peer)?;
    Ok(fd)
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting: {0}")]
    Connect(nix::Error),
    #[error("refusing peer: {0}")]
    Peer(String),
}

/// Accepts connections on a `SOCK_SEQPACKET` listener until aborted, running `conn` for
/// each peer of our own uid; aborting also ends every connection task.
pub async fn accept_seqpacket<F, Fut>(listener: OwnedFd, what: &'static str, conn: F)
where
    F: Fn(OwnedFd) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // SAFETY: we own the fd and nothing else registers or closes it while `listener` lives.
    let listener = match unsafe { AsyncFd::register(listener) } {
        Ok(l) => l,
        Err(e) => return warn!(error = %e, socket = what, "socket not pollable"),
    };
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            guard = listener.readable() => {
                let Ok(mut guard) = guard else { return };
                match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK) {
                    Ok(raw) => {
                        // SAFETY: accept4 returned a new fd that we now own.
                        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                        match same_user(&fd) {
                            Ok(()) => drop(conns.spawn(conn(fd))),
                            Err(why) => warn!(socket = what, %why, "refusing connection"),
                        }
                    }
                    Err(nix::Error::EAGAIN) => guard.clear_ready(),
                    Err(e) => warn!(error = %e, socket = what, "accept failed"),
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Only a process running as our own user (root on a node) may use these sockets: checked
/// with `SO_PEERCRED`, on accepted connections (the client) and on connected ones (the
/// listener's creator).
pub fn same_user(fd: &OwnedFd) -> Result<(), String> {
    let cred = nix::sys::socket::getsockopt(fd, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("no peer credentials: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if cred.uid() == me {
        Ok(())
    } else {
        Err(format!("peer uid {} (pid {}) is not our uid {me}", cred.uid(), cred.pid()))
    }
}
