//! Datagram I/O with fd passing on a unix `SOCK_SEQPACKET` socket, blocking or under
//! tokio: one ZDS (or plugin) message is one datagram, so no framing is needed.
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Largest request the agent accepts; anything longer is truncated and rejected.
pub const MAX_DATAGRAM: usize = 64 * 1024;

/// One received datagram and the fds that came with it (owned: closed when dropped).
#[derive(Debug)]
pub struct Datagram {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Why a datagram could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("socket error: {0}")]
    Io(#[from] nix::Error),
    #[error("datagram larger than {MAX_DATAGRAM} bytes")]
    Truncated,
    #[error("peer closed the connection")]
    Closed,
    #[error("polling the socket: {0}")]
    Poll(std::io::Error),
}

/// Receives one datagram (blocking or not, per the socket's mode).
pub fn recv_datagram(fd: RawFd) -> Result<Datagram, WireError> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut cmsg = nix::cmsg_space!([RawFd; 8]);
    let (len, fds, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds in our table; we own them.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        let truncated = msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (msg.bytes, fds, truncated)
    };
    if truncated {
        return Err(WireError::Truncated);
    }
    if len == 0 && fds.is_empty() {
        return Err(WireError::Closed);
    }
    buf.truncate(len);
    Ok(Datagram { bytes: buf, fds })
}

/// Sends one datagram with optional fds.
pub fn send_datagram(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> Result<(), WireError> {
    let iov = [IoSlice::new(bytes)];
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() { vec![] } else { vec![ControlMessage::ScmRights(fds)] };
    sendmsg::<()>(fd, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// The first datagram a node agent sends on a ZDS connection it opened: `ZdsHello{V1}`.
pub fn hello() -> Vec<u8> {
    use prost::Message;
    ztunnel_proto::zds::ZdsHello { version: ztunnel_proto::zds::Version::V1 as i32 }.encode_to_vec()
}

/// Receives one datagram on a non-blocking socket registered with tokio.
pub async fn recv_async(conn: &tokio::io::unix::AsyncFd<OwnedFd>) -> Result<Datagram, WireError> {
    use std::os::fd::AsRawFd;
    loop {
        let mut guard = conn.readable().await.map_err(WireError::Poll)?;
        match recv_datagram(conn.as_raw_fd()) {
            Err(WireError::Io(nix::Error::EAGAIN)) => guard.clear_ready(),
            other => return other,
        }
    }
}

/// Sends one datagram (with fds) on a non-blocking socket registered with tokio.
pub async fn send_async(
    conn: &tokio::io::unix::AsyncFd<OwnedFd>,
    bytes: &[u8],
    fds: &[RawFd],
) -> Result<(), WireError> {
    use std::os::fd::AsRawFd;
    loop {
        let mut guard = conn.writable().await.map_err(WireError::Poll)?;
        match send_datagram(conn.as_raw_fd(), bytes, fds) {
            Err(WireError::Io(nix::Error::EAGAIN)) => guard.clear_ready(),
            other => return other,
        }
    }
}
